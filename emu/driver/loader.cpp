// PTX and fatbin parsing for the emulated driver's module loader.
//
// PTX: `.version`, `.target`, and for every `.entry` its parameter list (sizes and alignments
// from `.param .b8 name[N]`, `.param .u64 name`, `.param .align A ...`), `.maxntid`, `.reqntid`
// and the `.shared` bytes declared in its body.
//
// Fatbin (as nvcc -fatbin writes it): a 16-byte header (u32 magic 0xBA55ED50, u16 version, u16
// header size, u64 size of the entries), then entries, each a header
//   u16 kind (1 PTX, 2 ELF), u16 version, u32 header size, u64 payload size,
//   u32 compressed size, u32 reserved, u16 minor, u16 major, u32 arch (e.g. 90),
//   u32 name offset, u32 name length, u64 flags (0x2000: compressed), u64 reserved,
//   u64 uncompressed size
// followed by the payload.
#include <string.h>

#include <cctype>
#include <cstdlib>

#include "driver.h"

namespace emu {

namespace {

struct Lexer {
    const std::string& s;
    size_t i = 0;
    explicit Lexer(const std::string& t) : s(t) {}

    // Skips whitespace and comments.
    void skip() {
        for (;;) {
            while (i < s.size() && isspace(static_cast<unsigned char>(s[i]))) i++;
            if (i + 1 < s.size() && s[i] == '/' && s[i + 1] == '/') {
                while (i < s.size() && s[i] != '\n') i++;
            } else if (i + 1 < s.size() && s[i] == '/' && s[i + 1] == '*') {
                size_t e = s.find("*/", i + 2);
                i = e == std::string::npos ? s.size() : e + 2;
            } else {
                return;
            }
        }
    }
    bool eof() {
        skip();
        return i >= s.size();
    }
    // A token: an identifier-like word (may start with '.', '%', '$', '_'), a number, or one
    // punctuation character.
    std::string next() {
        skip();
        if (i >= s.size()) return "";
        size_t b = i;
        auto word = [](char c) {
            return isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '$' || c == '%';
        };
        if (word(s[i])) {
            while (i < s.size() && word(s[i])) i++;
        } else if (s[i] == '"') {
            i++;
            while (i < s.size() && s[i] != '"') i++;
            if (i < s.size()) i++;
        } else {
            i++;
        }
        return s.substr(b, i - b);
    }
    std::string peek() {
        size_t save = i;
        std::string t = next();
        i = save;
        return t;
    }
};

size_t scalar_size(const std::string& t) {
    static const char* const one[] = {".b8", ".u8", ".s8", ".pred"};
    static const char* const two[] = {".b16", ".u16", ".s16", ".f16", ".bf16"};
    static const char* const four[] = {".b32", ".u32", ".s32", ".f32", ".f16x2", ".bf16x2"};
    static const char* const eight[] = {".b64", ".u64", ".s64", ".f64"};
    for (auto x : one)
        if (t == x) return 1;
    for (auto x : two)
        if (t == x) return 2;
    for (auto x : four)
        if (t == x) return 4;
    for (auto x : eight)
        if (t == x) return 8;
    if (t == ".b128") return 16;
    return 0;
}

bool parse_uint(const std::string& t, unsigned long long& v) {
    if (t.empty()) return false;
    char* end = nullptr;
    v = strtoull(t.c_str(), &end, 0);
    return end && *end == '\0';
}

// Parses "`.param` [.align A] [.ptr ...] TYPE name[N]" after `.param` has been read.
bool parse_param(Lexer& lx, PtxEntry& e, std::string& err) {
    size_t align = 0, elem = 0;
    std::string t = lx.next();
    while (true) {
        if (t == ".align") {
            unsigned long long a;
            if (!parse_uint(lx.next(), a)) {
                err = "bad .align in the parameters of " + e.name;
                return false;
            }
            align = a;
        } else if (t == ".ptr" || t == ".global" || t == ".const" || t == ".shared" || t == ".local") {
            // state-space qualifiers of .ptr: no effect on the size
        } else if (size_t sz = scalar_size(t)) {
            elem = sz;
        } else {
            break;
        }
        t = lx.next();
    }
    if (elem == 0) {
        err = "parameter of " + e.name + " has no type";
        return false;
    }
    // t is the name.
    size_t count = 1;
    if (lx.peek() == "[") {
        lx.next();
        unsigned long long n;
        if (!parse_uint(lx.next(), n) || lx.next() != "]") {
            err = "bad array size in the parameters of " + e.name;
            return false;
        }
        count = n;
    }
    e.param_sizes.push_back(elem * count);
    e.param_aligns.push_back(align ? align : elem);
    return true;
}

bool parse_dims(Lexer& lx, unsigned d[3]) {
    for (int k = 0; k < 3; k++) {
        unsigned long long v;
        if (!parse_uint(lx.next(), v)) return false;
        d[k] = static_cast<unsigned>(v);
        if (k < 2) {
            if (lx.peek() != ",") {
                for (int r = k + 1; r < 3; r++) d[r] = 1;
                return true;
            }
            lx.next();
        }
    }
    return true;
}

// Skips a `{ ... }` body, adding up the `.shared` declarations (not `.extern`) at any depth.
bool scan_body(Lexer& lx, PtxEntry& e, std::string& err) {
    int depth = 0;
    std::string prev;
    do {
        std::string t = lx.next();
        if (t.empty()) {
            err = "unterminated body of " + e.name;
            return false;
        }
        if (t == "{") depth++;
        else if (t == "}") depth--;
        else if (t == ".shared" && prev != ".extern" && (prev == ";" || prev == "{" || prev == "}")) {
            // .shared [.align A] TYPE name[N];
            size_t align = 1, elem = 0, count = 1;
            std::string u = lx.next();
            while (true) {
                if (u == ".align") {
                    unsigned long long a;
                    if (!parse_uint(lx.next(), a)) break;
                    align = a;
                } else if (size_t sz = scalar_size(u)) {
                    elem = sz;
                } else if (u.size() && u[0] == '.') {
                    // other qualifiers (.v2, .v4 ...)
                    if (u == ".v2") count *= 2;
                    if (u == ".v4") count *= 4;
                } else {
                    break;
                }
                u = lx.next();
            }
            // u is the name; array dimensions follow.
            while (lx.peek() == "[") {
                lx.next();
                unsigned long long n;
                std::string v = lx.next();
                if (v == "]") break;  // unsized
                if (!parse_uint(v, n)) break;
                count *= n;
                lx.next();
            }
            if (align < elem) align = elem;
            if (align == 0) align = 1;
            e.static_shared = (e.static_shared + align - 1) / align * align + elem * count;
            t = u;
        }
        prev = t;
    } while (depth > 0);
    return true;
}

}  // namespace

bool parse_ptx(const std::string& text, PtxModule& out, std::string& err) {
    Lexer lx(text);
    out = PtxModule();
    while (!lx.eof()) {
        std::string t = lx.next();
        if (t == ".version") {
            std::string v = lx.next();  // "9.0" lexes as one token
            size_t dot = v.find('.');
            if (dot == std::string::npos) {
                err = "malformed .version " + v;
                return false;
            }
            out.version_major = atoi(v.substr(0, dot).c_str());
            out.version_minor = atoi(v.substr(dot + 1).c_str());
        } else if (t == ".target") {
            out.target = lx.next();
            while (lx.peek() == ",") {
                lx.next();
                lx.next();
            }
        } else if (t == ".entry") {
            PtxEntry e;
            e.name = lx.next();
            if (lx.next() != "(") {
                err = "expected '(' after .entry " + e.name;
                return false;
            }
            if (lx.peek() == ")") {
                lx.next();
            } else {
                for (;;) {
                    if (lx.next() != ".param") {
                        err = "expected .param in the parameters of " + e.name;
                        return false;
                    }
                    if (!parse_param(lx, e, err)) return false;
                    std::string sep = lx.next();
                    if (sep == ")") break;
                    if (sep != ",") {
                        err = "expected ',' or ')' in the parameters of " + e.name;
                        return false;
                    }
                }
            }
            // Performance directives up to the body (or ';' for a declaration).
            for (;;) {
                std::string d = lx.next();
                if (d == ".maxntid" || d == ".reqntid") {
                    if (!parse_dims(lx, d == ".maxntid" ? e.maxntid : e.reqntid)) {
                        err = "malformed " + d + " of " + e.name;
                        return false;
                    }
                } else if (d == ".minnctapersm" || d == ".maxnreg" || d == ".maxnctapersm") {
                    lx.next();
                } else if (d == "{") {
                    lx.i -= 1;
                    if (!scan_body(lx, e, err)) return false;
                    break;
                } else if (d == ";") {
                    break;
                } else if (d.empty()) {
                    err = "unterminated .entry " + e.name;
                    return false;
                }
                // anything else (e.g. .noreturn, .explicitcluster) is skipped
            }
            out.entries.push_back(e);
        } else if (t == "{") {
            // body of a .func: skip
            int depth = 1;
            while (depth > 0) {
                std::string u = lx.next();
                if (u.empty()) break;
                if (u == "{") depth++;
                if (u == "}") depth--;
            }
        }
    }
    if (out.version_major == 0) {
        err = "no .version directive (not PTX)";
        return false;
    }
    if (out.target.empty()) {
        err = "no .target directive";
        return false;
    }
    return true;
}

int max_ptx_isa(int cuda) {
    int major = cuda / 1000, minor = (cuda % 1000) / 10;
    // PTX ISA shipped with each CUDA release (PTX ISA documentation, release notes).
    if (major >= 13) return 90 + minor;  // 13.0: 9.0, 13.1: 9.1
    if (major == 12) {
        static const int isa[] = {80, 81, 82, 83, 84, 85, 85, 86, 87, 88};  // 12.0 .. 12.9
        return isa[minor > 9 ? 9 : minor];
    }
    if (major == 11) return 70 + (minor > 8 ? 8 : minor);
    return 60;
}

bool ptx_target_runs_on(const std::string& target, int sm, std::string& why) {
    if (target.compare(0, 3, "sm_") != 0) {
        why = "unknown .target " + target;
        return false;
    }
    const char* p = target.c_str() + 3;
    char* end = nullptr;
    long t = strtol(p, &end, 10);
    std::string suffix = end ? end : "";
    if (end == p) {
        why = "unknown .target " + target;
        return false;
    }
    if (suffix == "a") {
        // Architecture-specific features: only that exact architecture.
        if (t != sm) {
            why = ".target " + target + " uses sm_" + std::to_string(t) +
                  "-specific features; the device is sm_" + std::to_string(sm);
            return false;
        }
        return true;
    }
    if (suffix == "f") {
        // Family-specific: same major, minor at least the target's.
        if (t / 10 != sm / 10 || t > sm) {
            why = ".target " + target + " is family-specific; the device is sm_" + std::to_string(sm);
            return false;
        }
        return true;
    }
    if (!suffix.empty()) {
        why = "unknown .target " + target;
        return false;
    }
    if (t > sm) {
        why = ".target " + target + " is newer than the device (sm_" + std::to_string(sm) + ")";
        return false;
    }
    return true;
}

namespace {
template <class T>
T rd(const unsigned char* p) {
    T v;
    memcpy(&v, p, sizeof v);
    return v;
}
}  // namespace

size_t fatbin_size(const void* image) {
    const unsigned char* p = static_cast<const unsigned char*>(image);
    if (rd<uint32_t>(p) != 0xBA55ED50u) return 0;
    return rd<uint16_t>(p + 6) + rd<uint64_t>(p + 8);
}

bool parse_fatbin(const void* image, std::vector<FatbinEntry>& out, std::string& err) {
    const unsigned char* p = static_cast<const unsigned char*>(image);
    if (rd<uint32_t>(p) != 0xBA55ED50u) {
        err = "not a fatbin";
        return false;
    }
    uint16_t hsize = rd<uint16_t>(p + 6);
    uint64_t total = rd<uint64_t>(p + 8);
    if (hsize < 16) {
        err = "fatbin header too small";
        return false;
    }
    const unsigned char* e = p + hsize;
    const unsigned char* end = e + total;
    while (e < end) {
        if (end - e < 64) {
            err = "truncated fatbin entry header";
            return false;
        }
        FatbinEntry fe;
        fe.kind = rd<uint16_t>(e);
        uint32_t eh = rd<uint32_t>(e + 4);
        uint64_t size = rd<uint64_t>(e + 8);
        uint32_t compressed_size = rd<uint32_t>(e + 16);
        fe.sm = static_cast<int>(rd<uint32_t>(e + 28));
        uint64_t flags = rd<uint64_t>(e + 40);
        uint64_t uncompressed = eh >= 64 ? rd<uint64_t>(e + 56) : 0;
        fe.compressed = (flags & 0x2000) != 0 || (flags & 0x8000) != 0 || compressed_size != 0 ||
                        uncompressed != 0;
        if (eh < 64 || static_cast<uint64_t>(end - e) < eh + size) {
            err = "fatbin entry runs past the end of the image";
            return false;
        }
        fe.payload.assign(reinterpret_cast<const char*>(e + eh), size);
        if (fe.kind == 1) {
            // PTX is NUL-padded.
            size_t z = fe.payload.find('\0');
            if (z != std::string::npos) fe.payload.resize(z);
        }
        out.push_back(fe);
        e += eh + size;
    }
    return true;
}

}  // namespace emu
