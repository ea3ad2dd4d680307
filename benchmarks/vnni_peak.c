/* vnni_peak.c - what one core's vpdpbusd can do: the int8 ceiling no matmul library can pass on this CPU.
 *
 *     gcc -O2 -o /tmp/vnni_peak benchmarks/vnni_peak.c && /tmp/vnni_peak
 *
 * Runs 12 independent vpdpbusd on 512-bit registers in a loop (64 u8 x s8 multiply-adds each, 128 ops), then a
 * dependent chain of vpaddd (latency 1 cycle: its rate is the core's clock), on one core, and prints instructions per
 * second, int8 ops per second and instructions per cycle. Needs avx512_vnni (exits 2 without it). */
#include <stdio.h>
#include <time.h>

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int main(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512vnni")) {
        puts("no avx512_vnni on this CPU");
        return 2;
    }
    const long n = 50000000;
    __asm__ volatile("vpternlogd $0xff, %%zmm1, %%zmm1, %%zmm1\n\tvpternlogd $0xff, %%zmm2, %%zmm2, %%zmm2" ::
                         : "xmm1", "xmm2");
    double t0 = seconds();
    for (long i = 0; i < n; i++)
        __asm__ volatile("vpdpbusd %%zmm1, %%zmm2, %%zmm4\n\tvpdpbusd %%zmm1, %%zmm2, %%zmm5\n\t"
                         "vpdpbusd %%zmm1, %%zmm2, %%zmm6\n\tvpdpbusd %%zmm1, %%zmm2, %%zmm7\n\t"
                         "vpdpbusd %%zmm1, %%zmm2, %%zmm8\n\tvpdpbusd %%zmm1, %%zmm2, %%zmm9\n\t"
                         "vpdpbusd %%zmm1, %%zmm2, %%zmm10\n\tvpdpbusd %%zmm1, %%zmm2, %%zmm11\n\t"
                         "vpdpbusd %%zmm1, %%zmm2, %%zmm12\n\tvpdpbusd %%zmm1, %%zmm2, %%zmm13\n\t"
                         "vpdpbusd %%zmm1, %%zmm2, %%zmm14\n\tvpdpbusd %%zmm1, %%zmm2, %%zmm15" ::
                             : "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13",
                               "xmm14", "xmm15");
    const double dp = 12.0 * (double)n / (seconds() - t0);
    t0 = seconds();
    for (long i = 0; i < n; i++)
        __asm__ volatile("vpaddd %%zmm1, %%zmm4, %%zmm4\n\tvpaddd %%zmm1, %%zmm4, %%zmm4\n\t"
                         "vpaddd %%zmm1, %%zmm4, %%zmm4\n\tvpaddd %%zmm1, %%zmm4, %%zmm4\n\t"
                         "vpaddd %%zmm1, %%zmm4, %%zmm4\n\tvpaddd %%zmm1, %%zmm4, %%zmm4\n\t"
                         "vpaddd %%zmm1, %%zmm4, %%zmm4\n\tvpaddd %%zmm1, %%zmm4, %%zmm4" ::
                             : "xmm4");
    const double hz = 8.0 * (double)n / (seconds() - t0);
    printf("vpdpbusd zmm: %.2f G/s = %.0f GOP/s (int8) per core; clock ~%.2f GHz; %.2f vpdpbusd per cycle\n",
           dp / 1e9, 128.0 * dp / 1e9, hz / 1e9, dp / hz);
    return 0;
}
