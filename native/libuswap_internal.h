/* What the `uswap exec` preload library (native/preload.c) uses of
 * libuswap beyond include/uswap.h: the fork requests need fds received with
 * a reply and the reply's fields. Not exported from libuswap.so (hidden
 * visibility); the preload library is linked with its own copy. */
#ifndef USWAP_INTERNAL_H
#define USWAP_INTERNAL_H

#include <stdarg.h>

#include "uswap.h"

/* snprintf without the C library's printf (see libuswap.c): %s %.Ns %d %ld
 * %u %lu %zu %x %lx %p %%. Returns the length it wanted, like snprintf. */
int uswap__vformat(char *buf, size_t cap, const char *fmt, va_list ap);
int uswap__format(char *buf, size_t cap, const char *fmt, ...);

/* One request with `nfds` fds, its reply kept (uswap__reply) with any fds
 * received (uswap__received). The caller holds the connection's lock. */
int uswap__exchange_fds(uswap_conn *c, const char *what, const char *json, const int *fds, int nfds);
const char *uswap__reply(const uswap_conn *c);
/* Move up to `max` fds received with the last reply into fds; the count. */
int uswap__received(uswap_conn *c, int *fds, int max);
void uswap__lock(uswap_conn *c);
void uswap__unlock(uswap_conn *c);
/* A non-blocking userfaultfd with the features the daemon needs, or a negative code. */
int uswap__open_uffd(uswap_conn *c);
int uswap__json_string(const char *json, const char *key, char *out, size_t cap);
int uswap__json_long(const char *json, const char *key, long *out);
/* Close a connection inherited across fork without sending anything on it. */
void uswap__abandon(uswap_conn *c);

#endif
