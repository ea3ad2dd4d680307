/* onednn_versions.c - one int8 matmul benchmark built against two oneDNN releases (benchmarks/onednn_versions.sh):
 * the linear layer medquant's static int8 runs (src u8 [M, K] with a common zero point of 128 and a scale, weights s8
 * [K, N] reordered once into the layout the primitive asks for, per-output-channel weight scales, dst f32), plain and
 * with a bias and an erf GELU post-op, at MiniLM's and BERT-base's layer shapes for a 1024-row piece (medquant's
 * row plan, csrc/workspace.h) and at 4096^3. Per case: 3 warm-up executions, then 30 timed ones (execute + stream
 * wait); prints one RESULT line with the best and median time and TOP/s, the implementation and a checksum of the
 * output (the same inputs in both builds, so the checksums must agree). Every oneDNN status is checked.
 *     cc -std=c11 -O2 -Wall -Wextra -Werror -I<prefix>/include onednn_versions.c -L<prefix>/lib -ldnnl
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "oneapi/dnnl/dnnl.h"

#define CHECK(f)                                                              \
    do {                                                                      \
        dnnl_status_t s_ = (f);                                               \
        if (s_ != dnnl_success) {                                             \
            fprintf(stderr, "[%s:%d] %s failed: status %d\n", __FILE__,       \
                    __LINE__, #f, (int)s_);                                   \
            exit(2);                                                          \
        }                                                                     \
    } while (0)

#define N_WARMUP 3
#define N_ITER 30

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rng(void) {
    uint64_t x = rng_state;
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    return rng_state = x;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static dnnl_memory_t make_mem(const_dnnl_memory_desc_t md, dnnl_engine_t eng) {
    dnnl_memory_t m;
    CHECK(dnnl_memory_create(&m, md, eng, DNNL_MEMORY_ALLOCATE));
    return m;
}

// Fill a memory object via map/unmap (portable for SYCL/USM builds too).
typedef enum { FILL_BYTES, FILL_F32_POS, FILL_F32_SMALL, FILL_S32_CONST } fill_t;
static void fill_mem(dnnl_memory_t m, size_t nbytes, fill_t kind, int32_t cval) {
    void *p;
    CHECK(dnnl_memory_map_data(m, &p));
    if (kind == FILL_BYTES) {
        uint8_t *b = (uint8_t *)p;
        for (size_t i = 0; i < nbytes; ++i) b[i] = (uint8_t)(rng() >> 24);
    } else if (kind == FILL_F32_POS) {
        float *f = (float *)p;
        for (size_t i = 0; i < nbytes / 4; ++i)
            f[i] = 0.001f + (float)(rng() % 1000) * 1e-5f;
    } else if (kind == FILL_F32_SMALL) {
        float *f = (float *)p;
        for (size_t i = 0; i < nbytes / 4; ++i)
            f[i] = ((float)(rng() % 2001) - 1000.f) * 1e-3f;
    } else {
        int32_t *s = (int32_t *)p;
        for (size_t i = 0; i < nbytes / 4; ++i) s[i] = cval;
    }
    CHECK(dnnl_memory_unmap_data(m, p));
}

static void run_case(dnnl_engine_t eng, dnnl_stream_t strm, int64_t M,
        int64_t K, int64_t N, int with_post) {
    dnnl_memory_desc_t src_md, wei_any_md, wei_plain_md, dst_md, bias_md = NULL;
    dnnl_dims_t sd = {M, K}, wd = {K, N}, dd = {M, N}, bd = {1, N};
    dnnl_dims_t one = {1}, nd = {N};
    CHECK(dnnl_memory_desc_create_with_tag(&src_md, 2, sd, dnnl_u8, dnnl_ab));
    CHECK(dnnl_memory_desc_create_with_tag(
            &wei_any_md, 2, wd, dnnl_s8, dnnl_format_tag_any));
    CHECK(dnnl_memory_desc_create_with_tag(&wei_plain_md, 2, wd, dnnl_s8, dnnl_ab));
    CHECK(dnnl_memory_desc_create_with_tag(&dst_md, 2, dd, dnnl_f32, dnnl_ab));
    if (with_post)
        CHECK(dnnl_memory_desc_create_with_tag(&bias_md, 2, bd, dnnl_f32, dnnl_ab));

    dnnl_primitive_attr_t attr;
    CHECK(dnnl_primitive_attr_create(&attr));
    CHECK(dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user));
    CHECK(dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_SRC, 0));
    CHECK(dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_WEIGHTS, 1 << 1));
    CHECK(dnnl_primitive_attr_set_zero_points_mask(attr, DNNL_ARG_SRC, 0));
    dnnl_post_ops_t po = NULL;
    if (with_post) {
        CHECK(dnnl_post_ops_create(&po));
        CHECK(dnnl_post_ops_append_eltwise(po, dnnl_eltwise_gelu_erf, 0.f, 0.f));
        CHECK(dnnl_primitive_attr_set_post_ops(attr, po));
    }

    dnnl_primitive_desc_t pd;
    CHECK(dnnl_matmul_primitive_desc_create(
            &pd, eng, src_md, wei_any_md, bias_md, dst_md, attr));
    const char *impl = NULL;
    CHECK(dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl));

    const_dnnl_memory_desc_t wei_md = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    const_dnnl_memory_desc_t scr_md = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
    size_t scr_sz = dnnl_memory_desc_get_size(scr_md);

    dnnl_primitive_t prim;
    CHECK(dnnl_primitive_create(&prim, pd));

    // Memories
    dnnl_memory_t src_m = make_mem(src_md, eng);
    dnnl_memory_t wplain_m = make_mem(wei_plain_md, eng);
    dnnl_memory_t wei_m = make_mem(wei_md, eng);
    dnnl_memory_t dst_m = make_mem(dst_md, eng);
    dnnl_memory_t scr_m = make_mem(scr_md, eng);
    dnnl_memory_t bias_m = NULL;
    dnnl_memory_desc_t s1_md, sN_md, zp_md;
    CHECK(dnnl_memory_desc_create_with_tag(&s1_md, 1, one, dnnl_f32, dnnl_a));
    CHECK(dnnl_memory_desc_create_with_tag(&sN_md, 1, nd, dnnl_f32, dnnl_a));
    CHECK(dnnl_memory_desc_create_with_tag(&zp_md, 1, one, dnnl_s32, dnnl_a));
    dnnl_memory_t ssrc_m = make_mem(s1_md, eng);
    dnnl_memory_t swei_m = make_mem(sN_md, eng);
    dnnl_memory_t zp_m = make_mem(zp_md, eng);

    fill_mem(src_m, (size_t)M * K, FILL_BYTES, 0);
    fill_mem(wplain_m, (size_t)K * N, FILL_BYTES, 0);
    fill_mem(ssrc_m, 4, FILL_F32_POS, 0);
    fill_mem(swei_m, (size_t)N * 4, FILL_F32_POS, 0);
    fill_mem(zp_m, 4, FILL_S32_CONST, 128);
    if (with_post) {
        bias_m = make_mem(bias_md, eng);
        fill_mem(bias_m, (size_t)N * 4, FILL_F32_SMALL, 0);
    }

    // Reorder weights once from plain ab into the queried layout.
    dnnl_primitive_desc_t rpd;
    CHECK(dnnl_reorder_primitive_desc_create(&rpd, wei_plain_md, eng, wei_md, eng, NULL));
    dnnl_primitive_t rprim;
    CHECK(dnnl_primitive_create(&rprim, rpd));
    dnnl_exec_arg_t rargs[2] = {{DNNL_ARG_FROM, wplain_m}, {DNNL_ARG_TO, wei_m}};
    CHECK(dnnl_primitive_execute(rprim, strm, 2, rargs));
    CHECK(dnnl_stream_wait(strm));

    dnnl_exec_arg_t args[9];
    int na = 0;
    args[na++] = (dnnl_exec_arg_t) {DNNL_ARG_SRC, src_m};
    args[na++] = (dnnl_exec_arg_t) {DNNL_ARG_WEIGHTS, wei_m};
    args[na++] = (dnnl_exec_arg_t) {DNNL_ARG_DST, dst_m};
    args[na++] = (dnnl_exec_arg_t) {DNNL_ARG_SCRATCHPAD, scr_m};
    args[na++] = (dnnl_exec_arg_t) {DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC, ssrc_m};
    args[na++] = (dnnl_exec_arg_t) {DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS, swei_m};
    args[na++] = (dnnl_exec_arg_t) {DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_SRC, zp_m};
    if (with_post) args[na++] = (dnnl_exec_arg_t) {DNNL_ARG_BIAS, bias_m};

    for (int i = 0; i < N_WARMUP; ++i) {
        CHECK(dnnl_primitive_execute(prim, strm, na, args));
        CHECK(dnnl_stream_wait(strm));
    }
    double t[N_ITER];
    for (int i = 0; i < N_ITER; ++i) {
        double t0 = now_ms();
        CHECK(dnnl_primitive_execute(prim, strm, na, args));
        CHECK(dnnl_stream_wait(strm));
        t[i] = now_ms() - t0;
    }
    // checksum of a few dst values (keeps the result "used")
    float *dp;
    double cs = 0;
    CHECK(dnnl_memory_map_data(dst_m, (void **)&dp));
    for (int64_t i = 0; i < M * N; i += 997) cs += dp[i];
    CHECK(dnnl_memory_unmap_data(dst_m, dp));

    qsort(t, N_ITER, sizeof(double), cmp_d);
    double best = t[0], med = 0.5 * (t[N_ITER / 2 - 1] + t[N_ITER / 2]);
    double ops = 2.0 * (double)M * K * N;
    printf("RESULT M=%lld K=%lld N=%lld variant=%s best_ms=%.4f med_ms=%.4f "
           "best_TOPs=%.4f med_TOPs=%.4f scratch_B=%zu wei_fmt_size=%zu impl=%s cs=%.3e\n",
            (long long)M, (long long)K, (long long)N,
            with_post ? "bias+gelu" : "plain", best, med, ops / (best * 1e9),
            ops / (med * 1e9), scr_sz, dnnl_memory_desc_get_size(wei_md), impl, cs);
    fflush(stdout);

    CHECK(dnnl_primitive_destroy(rprim));
    CHECK(dnnl_primitive_desc_destroy(rpd));
    CHECK(dnnl_primitive_destroy(prim));
    CHECK(dnnl_primitive_desc_destroy(pd));
    dnnl_memory_t ms[] = {src_m, wplain_m, wei_m, dst_m, scr_m, ssrc_m, swei_m, zp_m, bias_m};
    for (size_t i = 0; i < sizeof(ms) / sizeof(ms[0]); ++i)
        if (ms[i]) CHECK(dnnl_memory_destroy(ms[i]));
    if (po) CHECK(dnnl_post_ops_destroy(po));
    CHECK(dnnl_primitive_attr_destroy(attr));
    CHECK(dnnl_memory_desc_destroy(src_md));
    CHECK(dnnl_memory_desc_destroy(wei_any_md));
    CHECK(dnnl_memory_desc_destroy(wei_plain_md));
    CHECK(dnnl_memory_desc_destroy(dst_md));
    if (bias_md) CHECK(dnnl_memory_desc_destroy(bias_md));
    CHECK(dnnl_memory_desc_destroy(s1_md));
    CHECK(dnnl_memory_desc_destroy(sN_md));
    CHECK(dnnl_memory_desc_destroy(zp_md));
}

int main(void) {
    const dnnl_version_t *v = dnnl_version();
    printf("oneDNN %d.%d.%d hash=%s cpu_runtime=%u\n", v->major, v->minor,
            v->patch, v->hash, v->cpu_runtime);
    dnnl_engine_t eng;
    CHECK(dnnl_engine_create(&eng, dnnl_cpu, 0));
    dnnl_stream_t strm;
    CHECK(dnnl_stream_create(&strm, eng, dnnl_stream_default_flags));
    printf("effective_cpu_isa=%d max_threads(env OMP_NUM_THREADS)=%s\n",
            (int)dnnl_get_effective_cpu_isa(),
            getenv("OMP_NUM_THREADS") ? getenv("OMP_NUM_THREADS") : "(unset)");

    static const int64_t shapes[][3] = {{1024, 384, 1152}, {1024, 384, 384},
            {1024, 384, 1536}, {1024, 1536, 384}, {1024, 768, 3072},
            {1024, 3072, 768}, {4096, 4096, 4096}};
    int nshapes = (int)(sizeof(shapes) / sizeof(shapes[0]));
    for (int s = 0; s < nshapes; ++s)
        for (int wp = 0; wp < 2; ++wp) run_case(eng, strm, shapes[s][0], shapes[s][1], shapes[s][2], wp);

    CHECK(dnnl_stream_destroy(strm));
    CHECK(dnnl_engine_destroy(eng));
    return 0;
}
