/* Page states, page flags and the legal transitions between states: the one
 * declaration of each, read by the C fast path (fastpath.c) and, through the
 * cffi module built from this text (cdef_reader.py), by the Python engine
 * (uswap/daemon/pagetable.py takes every constant from there).
 *
 * docs/design.md section 4 says what each state means and where each
 * transition is made; the table below is what the checks enforce.
 */
#ifndef USWAP_PAGESTATE_H
#define USWAP_PAGESTATE_H

#include <stdint.h>

/* cdef: begin */
enum us_state {
    US_EMPTY = 0,      /* never populated (or dropped as a zero page): reads as zeros */
    US_RESIDENT = 1,   /* in memory; clean (write-protected, slot copy current) or dirty */
    US_WRITEBACK = 2,  /* resident, write-protected, a store write of it in flight */
    US_SWAPPED = 3,    /* only on the store, in `slot` */
    US_LOADING = 4,    /* a swap-in read, or a zero fill on a fault thread, in flight */
    US_POISONED = 5,   /* swap-in gave up (read_failure: sigbus): the client gets SIGBUS */
    US_AT_PARENT = 6,  /* a forked child's page held by the region it was forked from
                        * (daemon/fork.py): never charged, no slot */
    US_PUNCHING = 7    /* clean, being punched out of the memfd on a punch thread: still
                        * charged, slot (if any) current; faults park until it returns */
};

enum { US_NSTATES = 8 };

enum us_flag {
    US_F_DIRTY = 1,    /* resident and writable: the slot copy, if any, is stale */
    US_F_WAITERS = 2,  /* a write fault is parked on the page until its writeback ends
                        * (PUNCHING: any fault parked until the punch returns) */
    US_F_EVICT = 4,    /* drop the page once its writeback succeeds */
    US_F_ACTIVE = 8,   /* refaulted soon after eviction: working set, evicted last */
    US_F_DISCARD = 16  /* unmapped by the client while its I/O was in flight: forgotten
                        * when the I/O ends */
};

enum { US_NO_SLOT = -1 };

/* The states a page may be in before it moves to `to`, one bit per state
 * (bit s: state s is a legal predecessor); 0 for a value that is no state. */
static inline uint32_t us_legal_from(unsigned to);
/* cdef: end */

#define US_BIT(s) (1u << (s))

/* For each state, its legal predecessors. Every state change, in C and in
 * Python, is checked against this table (fastpath.c us_set_state,
 * PageTable.move); an illegal one is a bug, counted and logged, and fatal
 * under USWAP_STRICT_TRANSITIONS=1 (the tests). The cause of each edge:
 */
static const uint8_t US_LEGAL_FROM[US_NSTATES] = {
    [US_EMPTY] =
        US_BIT(US_EMPTY)         /* forgetting an unmapped range (nothing to do for the page) */
        | US_BIT(US_RESIDENT)    /* vanished from the memfd while dirty; an unattached child's copy dropped */
        | US_BIT(US_SWAPPED)     /* forgotten: the client unmapped it */
        | US_BIT(US_LOADING)     /* a zero fill on a fault thread not mapped */
        | US_BIT(US_POISONED)    /* forgotten */
        | US_BIT(US_AT_PARENT)   /* forgotten; the child closed; the parent's page went clean with no slot */
        | US_BIT(US_PUNCHING)    /* punch returned for a page with no slot; the region closed */
        | US_BIT(US_WRITEBACK),  /* the write returned on a closed region */
    [US_RESIDENT] =
        US_BIT(US_EMPTY)         /* zero fill (Python); a stray write adopted */
        | US_BIT(US_LOADING)     /* swap-in or fast-path zero fill mapped */
        | US_BIT(US_WRITEBACK)   /* write returned, clean or (failed) dirty */
        | US_BIT(US_AT_PARENT),  /* a forked child's page copied in */
    [US_WRITEBACK] =
        US_BIT(US_RESIDENT),     /* write-protected, slot allocated, write queued */
    [US_SWAPPED] =
        US_BIT(US_EMPTY)         /* fork_begin: a child's new table shares the slot */
        | US_BIT(US_RESIDENT)    /* vanished from the memfd while clean: the slot copy stands */
        | US_BIT(US_LOADING)     /* a load's page found unmapped when it ended */
        | US_BIT(US_AT_PARENT)   /* the parent's page written back: the child shares the slot */
        | US_BIT(US_PUNCHING),   /* punch returned */
    [US_LOADING] =
        US_BIT(US_SWAPPED)       /* swap-in started */
        | US_BIT(US_EMPTY),      /* zero fill started on a fault thread */
    [US_POISONED] =
        US_BIT(US_LOADING)       /* unreadable past read_deadline (sigbus mode) */
        | US_BIT(US_EMPTY)       /* fork_begin: a child's new table */
        | US_BIT(US_AT_PARENT),  /* adoption: the link to the parent's page died with the daemon */
    [US_AT_PARENT] =
        US_BIT(US_EMPTY),        /* fork_begin: a child's new table */
    [US_PUNCHING] =
        US_BIT(US_RESIDENT)      /* evicted clean, or forgotten while resident */
        | US_BIT(US_SWAPPED),    /* a stray write over a swapped page: the slot copy wins */
};

static inline uint32_t us_legal_from(unsigned to)
{
    return to < US_NSTATES ? US_LEGAL_FROM[to] : 0;
}

/* 1 when a page may move from `from` to `to`: one table lookup. */
static inline int us_transition_legal(unsigned from, unsigned to)
{
    return from < US_NSTATES && ((us_legal_from(to) >> from) & 1);
}

#endif
