// A small strict JSON reader (RFC 8259) for export manifests: one value per text, no comments, no trailing
// commas, no NaN / Infinity, no duplicate object keys, UTF-8 checked, \u escapes (surrogate pairs joined) decoded
// to UTF-8, nesting limited to 256 levels. Errors name the byte offset, line and column.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace refseg::json {

struct Error : std::runtime_error {
  size_t offset;
  Error(const std::string& message, size_t at) : std::runtime_error(message), offset(at) {}
};

enum class Type { Null, Bool, Number, String, Array, Object };
const char* type_name(Type type);

class Value {
 public:
  Type type = Type::Null;
  bool boolean = false;
  double number = 0;  // Number: the value; `text` keeps its digits (integers beyond 2^53 stay exact there)
  std::string text;   // String: the decoded string; Number: the literal as written
  std::vector<Value> items;                            // Array
  std::vector<std::pair<std::string, Value>> members;  // Object, in document order

  bool is(Type t) const { return type == t; }
  // Object member `key`, or nullptr (also for non-objects).
  const Value* find(const std::string& key) const;
  // Typed reads; throw Error (offset 0) naming `what` and the type found.
  const std::string& as_string(const std::string& what) const;
  int64_t as_int(const std::string& what) const;  // Number written as an integer that fits int64
  double as_number(const std::string& what) const;
  bool as_bool(const std::string& what) const;
};

// Parses the whole text; throws Error.
Value parse(const std::string& text);

}  // namespace refseg::json
