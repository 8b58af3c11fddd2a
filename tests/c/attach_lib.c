/* The dlopen'ed library of attach_target.c. */
__attribute__((noinline)) long work(long x) {
    long acc = 0;
    for (long i = 0; i < 3000; i++) {
        acc += (x * i) & 3;
        __asm__ volatile("" : "+r"(acc));
    }
    return 5000 + (acc & 0);
}
