/* The floor of signal-driven sampling, without Rust or hotpatch:
 * a busy loop on one thread, with a per-thread cpu-clock perf event
 * (mode 0) or a CLOCK_THREAD_CPUTIME_ID timer (mode 1) whose SIGPROF runs an
 * empty handler. Prints the loop's thread CPU time and the signals taken.
 *   gcc -O1 -o /tmp/signal_floor profiler/benches/signal_floor.c
 *   /tmp/signal_floor 0 0; /tmp/signal_floor 1000 0; /tmp/signal_floor 99 0
 * (BENCHMARKS.md, "overhead against the cost of the signal itself"). */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <stdint.h>
#include <signal.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <linux/perf_event.h>
static volatile long n;
static void h(int s){n++;}
static double cpu(void){struct timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec+t.tv_nsec/1e9;}
int main(int c,char**v){ int hz=atoi(v[1]); int mode=atoi(v[2]);
 if(hz){ struct sigaction sa; memset(&sa,0,sizeof sa); sa.sa_handler=h; sa.sa_flags=SA_RESTART; sigaction(SIGPROF,&sa,0);
 if(mode==0){ struct perf_event_attr a; memset(&a,0,sizeof a); a.type=PERF_TYPE_SOFTWARE; a.size=sizeof a; a.config=PERF_COUNT_SW_CPU_CLOCK; a.sample_period=1000000000/hz; a.exclude_kernel=1; a.wakeup_events=1; 
  int fd=syscall(SYS_perf_event_open,&a,0,-1,-1,PERF_FLAG_FD_CLOEXEC); if(fd<0){perror("perf");return 1;}
  fcntl(fd,F_SETFL,O_ASYNC); fcntl(fd,F_SETSIG,SIGPROF); struct f_owner_ex o={F_OWNER_TID,gettid()}; fcntl(fd,F_SETOWN_EX,&o);
  ioctl(fd, PERF_EVENT_IOC_REFRESH, 0); ioctl(fd, PERF_EVENT_IOC_ENABLE,0);
 } else { timer_t t; struct sigevent se; memset(&se,0,sizeof se); se.sigev_notify=SIGEV_THREAD_ID; se.sigev_signo=SIGPROF; se._sigev_un._tid=gettid(); timer_create(CLOCK_THREAD_CPUTIME_ID,&se,&t); struct itimerspec is={{0,1000000000/hz},{0,1000000000/hz}}; timer_settime(t,0,&is,0);} }
 volatile uint64_t x=1; double t0=cpu(); for(uint64_t i=0;i<600000000ULL;i++){x=x*6364136223846793005ULL+i; x^=x>>17;} printf("%.4f %ld\n",cpu()-t0,n); return 0;}
