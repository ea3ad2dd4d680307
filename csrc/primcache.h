/* primcache.h - oneDNN primitives built once per row count and reused: the one cache that linear layers (per piece
 * of their row plan, linear.h) and attention (per length bucket) keep their primitives (and the memory objects
 * executed with them) in.
 *
 * An entry is a struct of entry_size bytes that the owner's build function fills for `rows` rows (the
 * cache zero-fills it first) and its free function releases (also on a failed build, so free must accept a partly
 * built entry). Entries are allocated one by one: a pointer from get or find stays valid until clear or release.
 * Lookups (find) may run from several threads while no entry is added.
 */
#ifndef MQ_PRIMCACHE_H
#define MQ_PRIMCACHE_H

#include "status.h"

typedef mq_status (*mq_prim_build_fn)(void *owner, int64_t rows, void *entry);
typedef void (*mq_prim_free_fn)(void *entry);

typedef struct {
    size_t entry_size;
    mq_prim_build_fn build;
    mq_prim_free_fn free;
    int n, cap;
    int64_t *rows;
    void **entries;
} mq_prim_cache;

void mq_prim_cache_init(mq_prim_cache *c, size_t entry_size, mq_prim_build_fn build, mq_prim_free_fn free);
/* The entry for `rows`, built (build(owner, rows, entry)) on first use. */
mq_status mq_prim_cache_get(mq_prim_cache *c, void *owner, int64_t rows, void **entry);
/* The entry for `rows`, or NULL if it was not built. */
void *mq_prim_cache_find(const mq_prim_cache *c, int64_t rows);
/* Frees every entry (after a thread-count change: they are rebuilt on next use). */
void mq_prim_cache_clear(mq_prim_cache *c);
/* clear, and the cache's own arrays. */
void mq_prim_cache_release(mq_prim_cache *c);

#endif
