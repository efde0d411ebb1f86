/* Experiment only (bench/run.sh SY_NODELAY_PRELOAD=1): an LD_PRELOAD shim that sets TCP_NODELAY
 * on every socket the process accepts, to measure what Switchyard's streaming would gain if its
 * listener set TCP_NODELAY on accepted connections (it does not: axum::serve leaves Nagle on).
 * Build: gcc -O2 -shared -fPIC -o nodelay.so nodelay_preload.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

static void nodelay(int fd) {
  if (fd >= 0) { int one = 1; setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); }
}

int accept4(int s, struct sockaddr *a, socklen_t *l, int flags) {
  static int (*real)(int, struct sockaddr *, socklen_t *, int);
  if (!real) real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
  int fd = real(s, a, l, flags);
  nodelay(fd);
  return fd;
}

int accept(int s, struct sockaddr *a, socklen_t *l) {
  static int (*real)(int, struct sockaddr *, socklen_t *);
  if (!real) real = (int (*)(int, struct sockaddr *, socklen_t *))dlsym(RTLD_NEXT, "accept");
  int fd = real(s, a, l);
  nodelay(fd);
  return fd;
}
