// Benchmark support.

// Keeps the stream busy for `ns` nanoseconds of the GPU's global timer (one thread spins), so a
// host can queue work behind it and time the device alone, not its own launch rate.
extern "C" __global__ void hold_ns(long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < (unsigned long long)ns);
}
