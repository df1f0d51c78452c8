/* Exit 0 when AMX tile instructions run; non-zero or SIGILL when the CPU, kernel or VM refuses them.
   Used by scripts/install.sh: some VMs advertise AMX in /proc/cpuinfo yet fault on it, which kills a
   default (GGML_NATIVE) build of llama.cpp on the first quantized matmul. */
#include <immintrin.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
int main(void) {
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return 2;
    unsigned char cfg[64];
    memset(cfg, 0, sizeof cfg);
    cfg[0] = 1;            /* palette 1 */
    cfg[16] = 64;          /* tile 0: 64 bytes per row */
    cfg[48] = 16;          /* tile 0: 16 rows */
    _tile_loadconfig(cfg);
    _tile_zero(0);
    _tile_release();
    return 0;
}
