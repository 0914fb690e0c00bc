// Writes the block-codec fixtures in this folder with llama.cpp's own quantizer (ggml).
//
// Build and run from a llama.cpp checkout built with cmake (see README.md here):
//   cc -O2 make_codec_fixtures.c -I$LLAMA/ggml/include -L$LLAMA/build/bin -lggml-base \
//      -Wl,-rpath,$LLAMA/build/bin -lm -o make_codec_fixtures && ./make_codec_fixtures .
//
// Inputs are made here from a fixed-seed generator and written out too (input.f32,
// importance.f32), so the Rust side reads exactly what ggml saw.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"

#define N_PER_ROW 512
#define N_ROWS 10
#define N_DECODED_ROWS 2

static uint64_t state = 0x9E3779B97F4A7C15ull;

// xorshift64*: uniform in [0, 1).
static double uniform(void) {
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return (double)((state * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0;
}

static double gaussian(void) {
    double u = uniform() + 1e-12, v = uniform();
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

static void write_file(const char *dir, const char *name, const void *data, size_t len) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, len, f) != len || fclose(f) != 0) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : ".";
    static float x[N_ROWS * N_PER_ROW];
    static float imp[N_PER_ROW];
    for (int r = 0; r < N_ROWS; r++) {
        float *row = x + r * N_PER_ROW;
        for (int i = 0; i < N_PER_ROW; i++) {
            double g = gaussian();
            switch (r) {
            case 0: row[i] = (float)(0.02 * g); break;                      // weight-like
            case 1: row[i] = (float)g; break;                               // unit scale
            case 2: row[i] = (float)(0.05 * g * g * g); break;              // heavy tails
            case 3: row[i] = (float)(i % 97 == 5 ? 40.0 * g : 0.01 * g); break; // outliers
            case 4: row[i] = (float)fabs(0.1 * g); break;                   // all positive
            case 5: row[i] = (float)(-fabs(0.1 * g)); break;                // all negative
            case 6: row[i] = (i / 32) % 3 == 0 ? 0.0f : (float)(0.3 * g); break; // zero blocks
            case 7: row[i] = (i / 16) % 4 == 1 ? 0.125f : (float)(1e-7 * g); break; // const, tiny
            case 8: row[i] = (float)(1000.0 * g); break;                    // large
            default: row[i] = (float)(uniform() * 2.0 - 1.0); break;        // uniform
            }
        }
    }
    for (int i = 0; i < N_PER_ROW; i++) {
        double g = gaussian();
        imp[i] = (float)(i % 61 == 3 ? 50.0 + 10.0 * uniform() : exp(g));
    }
    write_file(dir, "input.f32", x, sizeof x);
    write_file(dir, "importance.f32", imp, sizeof imp);

    const enum ggml_type types[] = {
        GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_Q8_0,
        GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K,
        GGML_TYPE_IQ4_NL,
    };
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
        enum ggml_type type = types[t];
        size_t row = ggml_row_size(type, N_PER_ROW);
        uint8_t *q = malloc(row * N_ROWS);
        static float dec[N_DECODED_ROWS * N_PER_ROW];
        char name[256];
        for (int weighted = 0; weighted < 2; weighted++) {
            size_t n = ggml_quantize_chunk(type, x, q, 0, N_ROWS, N_PER_ROW,
                                           weighted ? imp : NULL);
            if (n != row * N_ROWS) {
                fprintf(stderr, "%s: %zu bytes, expected %zu\n", ggml_type_name(type), n,
                        row * N_ROWS);
                return 1;
            }
            snprintf(name, sizeof name, "%s.%s.bin", ggml_type_name(type),
                     weighted ? "imatrix" : "ref");
            write_file(dir, name, q, n);
            if (!weighted) {
                ggml_get_type_traits(type)->to_float(q, dec, N_DECODED_ROWS * N_PER_ROW);
                snprintf(name, sizeof name, "%s.decoded.f32", ggml_type_name(type));
                write_file(dir, name, dec, sizeof dec);
            }
        }
        free(q);
    }
    return 0;
}
