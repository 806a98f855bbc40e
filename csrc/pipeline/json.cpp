// Strict recursive-descent JSON reader (see json.h).
#include "json.h"

#include <charconv>
#include <cstring>

namespace refseg::json {

namespace {

constexpr int kMaxDepth = 256;

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  Value document() {
    skip_space();
    Value v = value(0);
    skip_space();
    if (pos_ != s_.size()) fail("unexpected text after the JSON value");
    return v;
  }

 private:
  const std::string& s_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& why) const { fail_at(why, pos_); }
  [[noreturn]] void fail_at(const std::string& why, size_t at) const {
    size_t line = 1, col = 1;
    for (size_t i = 0; i < at && i < s_.size(); ++i) {
      if (s_[i] == '\n') ++line, col = 1;
      else ++col;
    }
    throw Error("JSON: " + why + " at line " + std::to_string(line) + ", column " + std::to_string(col) +
                    " (byte " + std::to_string(at) + ")",
                at);
  }

  bool at_end() const { return pos_ >= s_.size(); }
  char peek() const { return at_end() ? '\0' : s_[pos_]; }

  void skip_space() {
    while (!at_end() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }

  void expect_word(const char* word) {
    const size_t n = std::strlen(word);
    if (s_.compare(pos_, n, word) != 0) fail(std::string("invalid literal (expected '") + word + "')");
    pos_ += n;
  }

  Value value(int depth) {
    if (depth > kMaxDepth) fail("nesting deeper than " + std::to_string(kMaxDepth) + " levels");
    if (at_end()) fail("unexpected end of text (a value was expected)");
    Value v;
    switch (peek()) {
      case '{': object(v, depth); break;
      case '[': array(v, depth); break;
      case '"': v.type = Type::String, v.text = string(); break;
      case 't': expect_word("true"), v.type = Type::Bool, v.boolean = true; break;
      case 'f': expect_word("false"), v.type = Type::Bool, v.boolean = false; break;
      case 'n': expect_word("null"); break;
      default:
        if (peek() == '-' || (peek() >= '0' && peek() <= '9')) number(v);
        else fail(std::string("unexpected character '") + peek() + "'");
    }
    return v;
  }

  void object(Value& v, int depth) {
    v.type = Type::Object;
    ++pos_;  // {
    skip_space();
    if (peek() == '}') {
      ++pos_;
      return;
    }
    while (true) {
      skip_space();
      if (peek() != '"') fail("expected a string key");
      const size_t key_at = pos_;
      std::string key = string();
      for (const auto& m : v.members)
        if (m.first == key) fail_at("duplicate key \"" + key + "\"", key_at);
      skip_space();
      if (peek() != ':') fail("expected ':' after a key");
      ++pos_;
      skip_space();
      v.members.emplace_back(std::move(key), value(depth + 1));
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == '}') {
        ++pos_;
        return;
      }
      fail("expected ',' or '}' in an object");
    }
  }

  void array(Value& v, int depth) {
    v.type = Type::Array;
    ++pos_;  // [
    skip_space();
    if (peek() == ']') {
      ++pos_;
      return;
    }
    while (true) {
      skip_space();
      v.items.push_back(value(depth + 1));
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == ']') {
        ++pos_;
        return;
      }
      fail("expected ',' or ']' in an array");
    }
  }

  void number(Value& v) {
    const size_t start = pos_;
    auto digits = [&] {
      const size_t from = pos_;
      while (!at_end() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
      return pos_ - from;
    };
    if (peek() == '-') ++pos_;
    if (peek() == '0') {
      ++pos_;
      if (peek() >= '0' && peek() <= '9') fail("leading zero in a number");
    } else if (!digits()) {
      fail("a digit must follow '-'");
    }
    if (peek() == '.') {
      ++pos_;
      if (!digits()) fail("a digit must follow the decimal point");
    }
    if (peek() == 'e' || peek() == 'E') {
      ++pos_;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (!digits()) fail("a digit must follow the exponent");
    }
    v.type = Type::Number;
    v.text = s_.substr(start, pos_ - start);
    const auto r = std::from_chars(v.text.data(), v.text.data() + v.text.size(), v.number);
    if (r.ec == std::errc::result_out_of_range) fail_at("number " + v.text + " is out of the double range", start);
    if (r.ec != std::errc() || r.ptr != v.text.data() + v.text.size()) fail_at("invalid number " + v.text, start);
  }

  unsigned hex4() {
    if (pos_ + 4 > s_.size()) fail("truncated \\u escape");
    unsigned cp = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = s_[pos_++];
      cp <<= 4;
      if (c >= '0' && c <= '9') cp |= static_cast<unsigned>(c - '0');
      else if (c >= 'a' && c <= 'f') cp |= static_cast<unsigned>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') cp |= static_cast<unsigned>(c - 'A' + 10);
      else fail("invalid hex digit in a \\u escape");
    }
    return cp;
  }

  static void put_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xc0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xe0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else {
      out += static_cast<char>(0xf0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    }
  }

  // one raw UTF-8 sequence starting at pos_ (lead byte >= 0x80), checked and copied
  void utf8(std::string& out) {
    const auto b0 = static_cast<unsigned char>(s_[pos_]);
    int n;
    unsigned cp, min;
    if (b0 >= 0xc2 && b0 <= 0xdf) n = 1, cp = b0 & 0x1fu, min = 0x80;
    else if (b0 >= 0xe0 && b0 <= 0xef) n = 2, cp = b0 & 0x0fu, min = 0x800;
    else if (b0 >= 0xf0 && b0 <= 0xf4) n = 3, cp = b0 & 0x07u, min = 0x10000;
    else fail("invalid UTF-8 byte");
    if (pos_ + static_cast<size_t>(n) >= s_.size()) fail("truncated UTF-8 sequence");
    for (int i = 1; i <= n; ++i) {
      const auto b = static_cast<unsigned char>(s_[pos_ + i]);
      if ((b & 0xc0) != 0x80) fail("invalid UTF-8 continuation byte");
      cp = (cp << 6) | (b & 0x3fu);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) fail("invalid UTF-8 sequence");
    out.append(s_, pos_, static_cast<size_t>(n) + 1);
    pos_ += static_cast<size_t>(n) + 1;
  }

  std::string string() {
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      if (at_end()) fail("unterminated string");
      const auto c = static_cast<unsigned char>(s_[pos_]);
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) fail("control character in a string (escape it)");
      if (c >= 0x80) {
        utf8(out);
        continue;
      }
      if (c != '\\') {
        out += static_cast<char>(c);
        ++pos_;
        continue;
      }
      ++pos_;
      if (at_end()) fail("unterminated escape");
      const char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xdc00 && cp <= 0xdfff) fail("lone low surrogate in a \\u escape");
          if (cp >= 0xd800 && cp <= 0xdbff) {
            if (s_.compare(pos_, 2, "\\u") != 0) fail("high surrogate without its low surrogate");
            pos_ += 2;
            const unsigned lo = hex4();
            if (lo < 0xdc00 || lo > 0xdfff) fail("high surrogate without its low surrogate");
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
          }
          put_utf8(out, cp);
          break;
        }
        default: fail(std::string("invalid escape '\\") + e + "'");
      }
    }
  }
};

[[noreturn]] void wrong(const std::string& what, const char* want, Type got) {
  throw Error(what + ": expected " + want + ", found " + type_name(got), 0);
}

}  // namespace

const char* type_name(Type type) {
  switch (type) {
    case Type::Null: return "null";
    case Type::Bool: return "a boolean";
    case Type::Number: return "a number";
    case Type::String: return "a string";
    case Type::Array: return "an array";
    case Type::Object: return "an object";
  }
  return "?";
}

const Value* Value::find(const std::string& key) const {
  if (type != Type::Object) return nullptr;
  for (const auto& m : members)
    if (m.first == key) return &m.second;
  return nullptr;
}

const std::string& Value::as_string(const std::string& what) const {
  if (type != Type::String) wrong(what, "a string", type);
  return text;
}

int64_t Value::as_int(const std::string& what) const {
  if (type != Type::Number) wrong(what, "an integer", type);
  int64_t out = 0;
  const auto r = std::from_chars(text.data(), text.data() + text.size(), out);
  if (r.ec != std::errc() || r.ptr != text.data() + text.size())
    throw Error(what + ": expected an integer, found " + text, 0);
  return out;
}

double Value::as_number(const std::string& what) const {
  if (type != Type::Number) wrong(what, "a number", type);
  return number;
}

bool Value::as_bool(const std::string& what) const {
  if (type != Type::Bool) wrong(what, "a boolean", type);
  return boolean;
}

Value parse(const std::string& text) { return Parser(text).document(); }

}  // namespace refseg::json
