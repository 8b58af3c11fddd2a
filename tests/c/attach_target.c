/* Fixture of the attach tests (tests/tests/attach_*.rs): a program that never
 * linked hotpatch. Worker threads call attach_compute() (in this binary) and
 * the function `work` of a library loaded with dlopen (argv[1]); every 10 ms
 * the main thread prints the latest results, one line: "R <compute> <lib>".
 * It runs until killed. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static _Atomic long last_compute;
static _Atomic long last_lib;
static long (*lib_work)(long);

__attribute__((noinline)) long attach_compute(long x) {
    long acc = 0;
    for (long i = 0; i < 2000; i++) {
        acc += (x ^ i) & 7;
        __asm__ volatile("" : "+r"(acc)); /* keep the loop: it is the CPU to profile */
    }
    return 1000 + x % 7 + (acc & 0);
}

static void *worker(void *arg) {
    long x = (long)arg;
    for (;;) {
        atomic_store(&last_compute, attach_compute(x));
        atomic_store(&last_lib, lib_work(x));
        x = (x + 1) % 1000;
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s LIB.so [threads]\n", argv[0]);
        return 2;
    }
    void *h = dlopen(argv[1], RTLD_NOW);
    if (!h) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 2;
    }
    lib_work = (long (*)(long))dlsym(h, "work");
    if (!lib_work) {
        fprintf(stderr, "dlsym: %s\n", dlerror());
        return 2;
    }
    int n = argc > 2 ? atoi(argv[2]) : 2;
    for (int i = 0; i < n; i++) {
        pthread_t t;
        pthread_create(&t, NULL, worker, (void *)(long)(i * 100));
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", (int)getpid());
    for (;;) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
        printf("R %ld %ld\n", atomic_load(&last_compute), atomic_load(&last_lib));
    }
}
