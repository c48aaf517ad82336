// Segment Anything in C++ with MLX: runs an mlx_evit SAM export (python -m mlx_evit export) on one image.
//
//   sam_app EXPORT_DIR IMAGE OUT.png [--point X,Y[,LABEL]]... [--box X0,Y0,X1,Y1] [--multimask]
//           [--logits OUT.npy]
//
// IMAGE: a binary PPM (P6, 8-bit) or an (H, W, 3) uint8 .npy file. Coordinates are pixels of IMAGE;
// LABEL 1 (default) is a foreground click, 0 a background click. Writes the mask as an 8-bit grey PNG
// (255 inside) and prints the chosen mask's index and predicted IoU. Every step follows export.json:
// the long-side resize (Pillow's bilinear filter, reproduced here in integer arithmetic), the
// normalisation and zero padding, the 1024-frame prompt transform with the padding point or box
// corners, the choice among the four masks, the bilinear upscaling, crop and threshold.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <mlx/mlx.h>

namespace mx = mlx::core;

// ---------------------------------------------------------------------------------------- JSON (reading)

struct Json {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  double number = 0;
  std::string text;
  std::vector<Json> items;
  std::map<std::string, Json> fields;

  const Json& operator[](const std::string& key) const {
    auto it = fields.find(key);
    if (kind != Object || it == fields.end()) throw std::runtime_error("export.json: no field '" + key + "'");
    return it->second;
  }
  const Json& operator[](size_t i) const {
    if (kind != Array || i >= items.size()) throw std::runtime_error("export.json: index out of range");
    return items[i];
  }
  bool has(const std::string& key) const { return kind == Object && fields.count(key); }
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& s) : s_(s) {}
  Json parse() {
    Json v = value();
    space();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;
  [[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error("export.json: " + what + " at offset " + std::to_string(i_));
  }
  void space() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) i_++;
  }
  bool eat(char c) {
    space();
    if (i_ < s_.size() && s_[i_] == c) return ++i_, true;
    return false;
  }
  std::string string() {
    if (!eat('"')) fail("expected a string");
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      char c = s_[i_++];
      if (c == '\\') {
        char e = s_.at(i_++);
        switch (e) {
          case 'n': out += '\n'; break;
          case 't': out += '\t'; break;
          case 'r': out += '\r'; break;
          case 'b': out += '\b'; break;
          case 'f': out += '\f'; break;
          case 'u': {  // keep ASCII; other code points become '?' (names only, never numbers)
            unsigned code = std::stoul(s_.substr(i_, 4), nullptr, 16);
            i_ += 4;
            out += code < 128 ? static_cast<char>(code) : '?';
            break;
          }
          default: out += e;
        }
      } else {
        out += c;
      }
    }
    if (!eat('"')) fail("unterminated string");
    return out;
  }
  Json value() {
    space();
    Json v;
    if (i_ >= s_.size()) fail("unexpected end");
    char c = s_[i_];
    if (c == '{') {
      i_++;
      v.kind = Json::Object;
      if (eat('}')) return v;
      do {
        std::string key = string();
        if (!eat(':')) fail("expected ':'");
        v.fields[key] = value();
      } while (eat(','));
      if (!eat('}')) fail("expected '}'");
    } else if (c == '[') {
      i_++;
      v.kind = Json::Array;
      if (eat(']')) return v;
      do v.items.push_back(value());
      while (eat(','));
      if (!eat(']')) fail("expected ']'");
    } else if (c == '"') {
      v.kind = Json::String;
      v.text = string();
    } else if (s_.compare(i_, 4, "true") == 0 || s_.compare(i_, 5, "false") == 0) {
      v.kind = Json::Bool;
      v.number = s_[i_] == 't';
      i_ += s_[i_] == 't' ? 4 : 5;
    } else if (s_.compare(i_, 4, "null") == 0) {
      i_ += 4;
    } else {
      size_t used = 0;
      v.kind = Json::Number;
      v.number = std::stod(s_.substr(i_, 40), &used);  // strtod: correctly rounded, as Python's repr
      i_ += used;
    }
    return v;
  }
};

Json read_json(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error(path + ": cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  std::string text = ss.str();
  return JsonParser(text).parse();
}

const Json& step(const Json& steps, const std::string& name) {
  for (const auto& s : steps.items)
    if (s["step"].text == name) return s;
  throw std::runtime_error("export.json: no '" + name + "' step");
}

// ---------------------------------------------------------------------------------------- images

struct Image {
  int h = 0, w = 0;
  std::vector<uint8_t> rgb;  // h * w * 3, row-major
};

Image read_image(const std::string& path) {
  Image im;
  if (path.size() > 4 && path.substr(path.size() - 4) == ".npy") {
    auto a = mx::load(path);
    if (a.ndim() != 3 || a.shape(2) != 3 || a.dtype() != mx::uint8)
      throw std::runtime_error(path + ": expected an (H, W, 3) uint8 array");
    a = mx::contiguous(a);
    a.eval();
    im.h = a.shape(0), im.w = a.shape(1);
    im.rgb.assign(a.data<uint8_t>(), a.data<uint8_t>() + a.size());
    return im;
  }
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot open");
  std::string magic;
  int maxval = 0;
  f >> magic;
  auto skip = [&f]() {  // whitespace and comments between header fields
    while (true) {
      int c = f.peek();
      if (c == '#') {
        std::string line;
        std::getline(f, line);
      } else if (std::isspace(c)) {
        f.get();
      } else {
        break;
      }
    }
  };
  skip(), f >> im.w, skip(), f >> im.h, skip(), f >> maxval;
  if (magic != "P6" || !f || maxval != 255 || im.w < 1 || im.h < 1)
    throw std::runtime_error(path + ": expected a binary 8-bit PPM (P6) or a .npy file");
  f.get();  // the single whitespace after maxval
  im.rgb.resize(size_t(im.h) * im.w * 3);
  f.read(reinterpret_cast<char*>(im.rgb.data()), im.rgb.size());
  if (!f) throw std::runtime_error(path + ": truncated PPM");
  return im;
}

// Pillow's Image.resize(..., BILINEAR) on 8-bit data (export.json: preprocessing, resize, algorithm).
struct Taps {
  std::vector<int> start, count;
  std::vector<int32_t> k;  // fixed-point weights, `width` per output
  int width = 0;
};

Taps pillow_taps(int n_in, int n_out) {
  const int bits = 22;
  double scale = double(n_in) / n_out, filterscale = std::max(scale, 1.0), support = filterscale;
  Taps t;
  t.width = int(std::ceil(support)) * 2 + 1;
  t.k.assign(size_t(n_out) * t.width, 0);
  for (int d = 0; d < n_out; d++) {
    double center = (d + 0.5) * scale;
    int xmin = std::max(int(center - support + 0.5), 0);
    int xmax = std::min(int(center + support + 0.5), n_in) - xmin;
    std::vector<double> w(xmax);
    double total = 0;
    for (int x = 0; x < xmax; x++) {
      double u = std::fabs((x + xmin - center + 0.5) / filterscale);
      w[x] = u < 1.0 ? 1.0 - u : 0.0;
      total += w[x];
    }
    for (int x = 0; x < xmax; x++) {
      double v = total != 0.0 ? w[x] / total : w[x];
      t.k[size_t(d) * t.width + x] = int32_t(v < 0 ? -0.5 + v * (1 << bits) : 0.5 + v * (1 << bits));
    }
    t.start.push_back(xmin), t.count.push_back(xmax);
  }
  return t;
}

uint8_t clip8(int32_t v) {
  if (v >= (1 << 30)) return 255;
  if (v <= 0) return 0;
  return uint8_t(v >> 22);
}

Image pillow_bilinear(const Image& in, int out_h, int out_w) {
  Taps th = pillow_taps(in.w, out_w), tv = pillow_taps(in.h, out_h);
  Image mid{in.h, out_w, std::vector<uint8_t>(size_t(in.h) * out_w * 3)};
  for (int y = 0; y < in.h; y++)  // horizontal pass (every row; Pillow skips rows nobody reads: same values)
    for (int x = 0; x < out_w; x++)
      for (int c = 0; c < 3; c++) {
        int32_t acc = 1 << 21;
        for (int j = 0; j < th.count[x]; j++)
          acc += in.rgb[(size_t(y) * in.w + th.start[x] + j) * 3 + c] * th.k[size_t(x) * th.width + j];
        mid.rgb[(size_t(y) * out_w + x) * 3 + c] = clip8(acc);
      }
  Image out{out_h, out_w, std::vector<uint8_t>(size_t(out_h) * out_w * 3)};
  for (int y = 0; y < out_h; y++)  // vertical pass
    for (int x = 0; x < out_w; x++)
      for (int c = 0; c < 3; c++) {
        int32_t acc = 1 << 21;
        for (int j = 0; j < tv.count[y]; j++)
          acc += mid.rgb[(size_t(tv.start[y] + j) * out_w + x) * 3 + c] * tv.k[size_t(y) * tv.width + j];
        out.rgb[(size_t(y) * out_w + x) * 3 + c] = clip8(acc);
      }
  return out;
}

// Grey 8-bit PNG with stored (uncompressed) deflate blocks: no zlib needed.
uint32_t crc32(const uint8_t* p, size_t n, uint32_t crc = 0) {
  crc = ~crc;
  for (size_t i = 0; i < n; i++) {
    crc ^= p[i];
    for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

void write_png(const std::string& path, const std::vector<uint8_t>& grey, int h, int w) {
  std::vector<uint8_t> raw;  // filter byte 0 + row
  for (int y = 0; y < h; y++) {
    raw.push_back(0);
    raw.insert(raw.end(), grey.begin() + size_t(y) * w, grey.begin() + size_t(y + 1) * w);
  }
  std::vector<uint8_t> z = {0x78, 0x01};
  uint32_t a = 1, b = 0;
  for (uint8_t v : raw) a = (a + v) % 65521, b = (b + a) % 65521;
  for (size_t pos = 0; pos < raw.size() || pos == 0; pos += 65535) {
    size_t len = std::min<size_t>(65535, raw.size() - pos);
    bool last = pos + len >= raw.size();
    z.push_back(last ? 1 : 0);
    z.push_back(len & 0xff), z.push_back(len >> 8), z.push_back(~len & 0xff), z.push_back((~len >> 8) & 0xff);
    z.insert(z.end(), raw.begin() + pos, raw.begin() + pos + len);
    if (last) break;
  }
  uint32_t adler = (b << 16) | a;
  for (int s = 24; s >= 0; s -= 8) z.push_back((adler >> s) & 0xff);
  std::ofstream f(path + ".tmp", std::ios::binary);
  auto be32 = [&f](uint32_t v) {
    for (int s = 24; s >= 0; s -= 8) f.put(char((v >> s) & 0xff));
  };
  auto chunk = [&](const char* type, const std::vector<uint8_t>& data) {
    be32(uint32_t(data.size()));
    std::vector<uint8_t> body(type, type + 4);
    body.insert(body.end(), data.begin(), data.end());
    f.write(reinterpret_cast<const char*>(body.data()), body.size());
    be32(crc32(body.data(), body.size()));
  };
  const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  f.write(reinterpret_cast<const char*>(sig), 8);
  std::vector<uint8_t> ihdr;
  for (uint32_t v : {uint32_t(w), uint32_t(h)})
    for (int s = 24; s >= 0; s -= 8) ihdr.push_back((v >> s) & 0xff);
  ihdr.insert(ihdr.end(), {8, 0, 0, 0, 0});  // 8-bit greyscale, no interlace
  chunk("IHDR", ihdr);
  chunk("IDAT", z);
  chunk("IEND", {});
  f.close();
  if (!f || std::rename((path + ".tmp").c_str(), path.c_str()) != 0)
    throw std::runtime_error(path + ": cannot write");
}

// ---------------------------------------------------------------------------------------- SAM steps

// torch's 1-D bilinear resize (align_corners False) as an (n_out, n_in) matrix (export.json: index_rule).
std::vector<float> linear_matrix(int n_in, int n_out) {
  std::vector<float> m(size_t(n_out) * n_in, 0.0f);
  float scale = float(n_in) / float(n_out);
  for (int d = 0; d < n_out; d++) {
    float s = float(double(scale) * (d + 0.5) - 0.5);
    s = std::max(s, 0.0f);
    int i0 = int(s), i1 = std::min(i0 + 1, n_in - 1);
    float w1 = s - float(i0), w0 = 1.0f - w1;
    m[size_t(d) * n_in + i0] += w0;
    m[size_t(d) * n_in + i1] += w1;
  }
  return m;
}

// Upscale low -> frame, crop to `crop`, resize to `out`, composed in double: an (out, low) float32 matrix.
mx::array postprocess_matrix(int low, int frame, int crop, int out) {
  auto up = linear_matrix(low, frame), down = linear_matrix(crop, out);
  std::vector<float> m(size_t(out) * low);
  for (int o = 0; o < out; o++)
    for (int j = 0; j < low; j++) {
      double acc = 0;
      for (int c = 0; c < crop; c++) acc += double(down[size_t(o) * crop + c]) * double(up[size_t(c) * low + j]);
      m[size_t(o) * low + j] = float(acc);
    }
  return mx::array(m.data(), {out, low}, mx::float32);
}

std::vector<double> numbers(const std::string& text, size_t n_min, size_t n_max, const std::string& option) {
  std::vector<double> v;
  std::stringstream ss(text);
  std::string part;
  while (std::getline(ss, part, ',')) v.push_back(std::stod(part));
  if (v.size() < n_min || v.size() > n_max) throw std::runtime_error(option + " " + text + ": wrong number of values");
  return v;
}

int run(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: sam_app EXPORT_DIR IMAGE OUT.png [--point X,Y[,LABEL]]... [--box X0,Y0,X1,Y1] "
                 "[--multimask] [--logits OUT.npy]\n";
    return 2;
  }
  std::string dir = argv[1], image_path = argv[2], out_path = argv[3], logits_path;
  std::vector<std::array<double, 3>> clicks;
  std::vector<double> box;
  bool multimask = false;
  for (int i = 4; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--multimask") {
      multimask = true;
    } else if ((a == "--point" || a == "--box" || a == "--logits") && i + 1 < argc) {
      std::string v = argv[++i];
      if (a == "--point") {
        auto p = numbers(v, 2, 3, a);
        clicks.push_back({p[0], p[1], p.size() > 2 ? p[2] : 1.0});
        if (clicks.back()[2] != 0 && clicks.back()[2] != 1) throw std::runtime_error("--point label must be 0 or 1");
      } else if (a == "--box") {
        box = numbers(v, 4, 4, a);
      } else {
        logits_path = v;
      }
    } else {
      throw std::runtime_error("unknown or incomplete option " + a);
    }
  }
  if (clicks.empty() && box.empty()) throw std::runtime_error("give at least one --point or a --box");

  Json spec = read_json(dir + "/export.json");
  if (spec["family"].text != "sam") throw std::runtime_error(dir + ": not a SAM export");
  const Json& enc = spec["functions"]["image_encoder"];
  int S = int(enc["inputs"][0]["shape"][1].number);
  const Json& norm = step(spec["preprocessing"], "normalize");
  int frame = int(spec["prompts"]["frame"].number);
  float threshold = float(step(spec["postprocessing"], "threshold")["value"].number);

  // Preprocessing: long side to S (Pillow bilinear), (x / 255 - mean) / std in float32, zero padding.
  Image img = read_image(image_path);
  double s = S * 1.0 / std::max(img.h, img.w);
  Image resized = std::max(img.h, img.w) == S ? img : pillow_bilinear(img, int(img.h * s + 0.5), int(img.w * s + 0.5));
  std::vector<float> x(size_t(S) * S * 3, 0.0f);
  for (int y = 0; y < resized.h; y++)
    for (int c = 0; c < resized.w * 3; c++) {
      float mean = float(norm["mean"][c % 3].number), std = float(norm["std"][c % 3].number);
      float v = float(resized.rgb[size_t(y) * resized.w * 3 + c]) / 255.0f;
      x[size_t(y) * S * 3 + c] = (v - mean) / std;
    }
  auto encoder = mx::import_function(dir + "/" + enc["file"].text);
  auto embeddings = encoder({mx::array(x.data(), {1, S, S, 3}, mx::float32)})[0];

  // Prompts: pixels -> the frame (long side `frame`), clicks then box corners (2, 3) or a padding point (-1).
  double fs = frame * 1.0 / std::max(img.h, img.w);
  int nh = int(img.h * fs + 0.5), nw = int(img.w * fs + 0.5);
  double sx = double(nw) / img.w, sy = double(nh) / img.h;
  std::vector<float> coords, labels;
  for (auto& p : clicks) coords.push_back(float(p[0] * sx)), coords.push_back(float(p[1] * sy)), labels.push_back(float(p[2]));
  if (!box.empty()) {
    for (int k = 0; k < 2; k++) coords.push_back(float(box[2 * k] * sx)), coords.push_back(float(box[2 * k + 1] * sy));
    labels.push_back(2), labels.push_back(3);
  } else {
    coords.push_back(0), coords.push_back(0), labels.push_back(-1);
  }
  int n = int(labels.size());
  const Json* dec = nullptr;
  for (const auto& [name, f] : spec["functions"].fields)
    if (f.has("points") && int(f["points"].number) == n) dec = &f;
  if (dec == nullptr)
    throw std::runtime_error("no prompt decoder for " + std::to_string(n) + " points in " + dir +
                             " (export with --points " + std::to_string(n) + ")");
  auto decoder = mx::import_function(dir + "/" + (*dec)["file"].text);
  int low = int((*dec)["inputs"][3]["shape"][1].number);  // mask_input (1, low, low, 1)
  auto outputs = decoder({embeddings, mx::array(coords.data(), {1, n, 2}, mx::float32),
                          mx::array(labels.data(), {1, n}, mx::float32), mx::zeros({1, low, low, 1}, mx::float32),
                          mx::zeros({1}, mx::float32)});
  auto iou = outputs[1];
  iou.eval();
  const float* iou_data = iou.data<float>();
  int best = 0;  // single-mask output; multimask: the highest predicted IoU among 1-3
  if (multimask) {
    best = 1;
    for (int k = 2; k < 4; k++)
      if (iou_data[k] > iou_data[best]) best = k;
  }

  // Postprocessing: (h, low) @ mask (low, low) @ (w, low)^T, then threshold.
  auto mask_low = mx::reshape(mx::slice(outputs[0], {0, best, 0, 0}, {1, best + 1, low, low}), {low, low});
  auto logits = mx::matmul(mx::matmul(postprocess_matrix(low, frame, nh, img.h), mask_low),
                           mx::transpose(postprocess_matrix(low, frame, nw, img.w)));
  logits = mx::contiguous(logits);
  logits.eval();
  std::vector<uint8_t> grey(size_t(img.h) * img.w);
  const float* l = logits.data<float>();
  size_t area = 0;
  for (size_t i = 0; i < grey.size(); i++) area += (grey[i] = l[i] > threshold ? 255 : 0) != 0;
  write_png(out_path, grey, img.h, img.w);
  if (!logits_path.empty()) mx::save(logits_path, logits);
  std::cout << "{\"mask\": " << best << ", \"iou\": " << iou_data[best] << ", \"area\": " << area
            << ", \"points\": " << n << "}\n";
  return 0;
}

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "sam_app: error: " << e.what() << "\n";
    return 1;
  }
}
