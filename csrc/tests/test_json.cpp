// The strict JSON reader (csrc/pipeline/json.cpp): RFC 8259 documents it must accept with their values, and
// documents it must refuse with an error naming the place.
//   test_json [MANIFEST.json]   (a manifest written by `refseg export`: parsed, and its image_size read)
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

#include "../pipeline/json.h"
#include "check.h"

using refseg::json::Error;
using refseg::json::Type;
using refseg::json::Value;
using refseg::json::parse;

namespace {

bool refused(const std::string& text, const char* needle) {
  try {
    parse(text);
  } catch (const Error& e) {
    if (std::strstr(e.what(), needle)) return true;
    std::fprintf(stderr, "  %s: got '%s'\n", text.c_str(), e.what());
    return false;
  }
  std::fprintf(stderr, "  %s: accepted\n", text.c_str());
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  // values
  const Value v = parse(
      " {\"a\": [1, -0.5, 2e3, 1E-2, 0, -0], \"s\": \"q\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\ud83d\\ude00\", "
      "\"t\": true, \"f\": false, \"n\": null, \"o\": {}, \"e\": [], \"big\": 1700000000123456789,"
      " \"utf8\": \"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\"}\n");
  CHECK(v.is(Type::Object) && v.members.size() == 9);
  const Value* a = v.find("a");
  CHECK(a && a->is(Type::Array) && a->items.size() == 6);
  if (a && a->items.size() == 6) {
    CHECK(a->items[0].as_int("a[0]") == 1 && a->items[1].number == -0.5 && a->items[2].number == 2000.0);
    CHECK(a->items[3].number == 0.01 && a->items[4].number == 0 && std::signbit(a->items[5].number));
    CHECK(a->items[1].text == "-0.5");
  }
  CHECK(v.find("s") && v.find("s")->as_string("s") == "q\"\\/\b\f\n\r\t\xc3\xa9\xf0\x9f\x98\x80");
  CHECK(v.find("t")->as_bool("t") && !v.find("f")->as_bool("f") && v.find("n")->is(Type::Null));
  CHECK(v.find("o")->is(Type::Object) && v.find("o")->members.empty() && v.find("e")->items.empty());
  CHECK(v.find("big")->as_int("big") == 1700000000123456789LL);  // beyond 2^53: exact through the text
  CHECK(v.find("utf8")->as_string("utf8") == "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80");
  CHECK(v.find("missing") == nullptr && v.find("a")->find("x") == nullptr);
  CHECK(parse("3").as_int("top") == 3 && parse("\"x\"").as_string("top") == "x");
  std::string deep;
  for (int i = 0; i < 200; ++i) deep += "[";
  for (int i = 0; i < 200; ++i) deep += "]";
  CHECK(parse(deep).is(Type::Array));

  // typed reads name the field
  try {
    v.find("a")->as_string("graphs.x");
    CHECK(false);
  } catch (const Error& e) {
    CHECK(std::strstr(e.what(), "graphs.x: expected a string, found an array") != nullptr);
  }
  try {
    v.find("a")->items[1].as_int("image_size");
    CHECK(false);
  } catch (const Error& e) {
    CHECK(std::strstr(e.what(), "image_size: expected an integer, found -0.5") != nullptr);
  }

  // refused documents
  CHECK(refused("", "unexpected end"));
  CHECK(refused("{\"a\": 1,}", "expected a string key"));
  CHECK(refused("[1, 2,]", "unexpected character ']'"));
  CHECK(refused("{\"a\": 1} x", "unexpected text after"));
  CHECK(refused("{\"a\": 1, \"a\": 2}", "duplicate key \"a\""));
  CHECK(refused("// c\n{}", "unexpected character '/'"));
  CHECK(refused("[NaN]", "unexpected character 'N'"));
  CHECK(refused("[Infinity]", "unexpected character 'I'"));
  CHECK(refused("[01]", "leading zero"));
  CHECK(refused("[1.]", "decimal point"));
  CHECK(refused("[-]", "digit must follow '-'"));
  CHECK(refused("[1e]", "exponent"));
  CHECK(refused("[1e999]", "out of the double range"));
  CHECK(refused("[+1]", "unexpected character '+'"));
  CHECK(refused("[\"a\nb\"]", "control character"));
  CHECK(refused("[\"\\x\"]", "invalid escape"));
  CHECK(refused("[\"\\u12g4\"]", "hex digit"));
  CHECK(refused("[\"\\ud83d\"]", "without its low surrogate"));
  CHECK(refused("[\"\\ude00\"]", "lone low surrogate"));
  CHECK(refused("[\"\xc3\"]", "UTF-8"));
  CHECK(refused("[\"\xc0\xaf\"]", "UTF-8"));          // overlong
  CHECK(refused("[\"\xed\xa0\x80\"]", "UTF-8"));      // encoded surrogate
  CHECK(refused("[\"abc", "unterminated string"));
  CHECK(refused("{\"a\" 1}", "expected ':'"));
  CHECK(refused("[tru]", "invalid literal"));
  CHECK(refused("[1 2]", "expected ',' or ']'"));
  CHECK(refused("{\"a\": 1 \"b\": 2}", "expected ',' or '}'"));
  std::string too_deep;
  for (int i = 0; i < 300; ++i) too_deep += "[";
  CHECK(refused(too_deep, "nesting deeper"));
  try {
    parse("{\n  \"a\": [1,\n   2,]\n}");
  } catch (const Error& e) {
    CHECK(std::strstr(e.what(), "line 3, column 6") != nullptr && e.offset == 18);
  }

  if (argc > 1) {  // a manifest written by refseg export
    std::ifstream in(argv[1], std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    const Value m = parse(text.str());
    CHECK(m.find("image_size") && m.find("image_size")->as_int("image_size") % 14 == 0);
    CHECK(m.find("graphs") && m.find("graphs")->find("sam_decoder") != nullptr);
  }
  if (g_failures) std::fprintf(stderr, "%d check(s) failed\n", g_failures);
  else std::printf("json reader: all checks passed\n");
  return g_failures ? 1 : 0;
}
