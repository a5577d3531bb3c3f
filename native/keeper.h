/* The client's keeper thread (keeper.c): reconnect and re-send the
 * regions when the daemon goes away. Declared once here; uffd_build.py
 * reads the declarations between the cdef markers. */
#ifndef USWAP_KEEPER_H
#define USWAP_KEEPER_H

#include <stdint.h>

/* cdef: begin */
struct us_keeper;
struct us_keeper *us_keeper_new(const char *path, int sock, double timeout);
int us_keeper_add(struct us_keeper *k, int64_t id, uint64_t addr, uint64_t size, int uffd, int memfd);
void us_keeper_remove(struct us_keeper *k, uint64_t addr);
void us_keeper_update(struct us_keeper *k, uint64_t addr, int64_t id, int uffd, int memfd);
int us_keeper_take_sock(struct us_keeper *k, double timeout);
int us_keeper_await_sock(struct us_keeper *k, double timeout);
int us_keeper_reconnects(struct us_keeper *k);
void us_keeper_stop(struct us_keeper *k);
/* cdef: end */

#endif
