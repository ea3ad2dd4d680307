/* primcache.c - the primitive cache (primcache.h): a small array of (rows, entry) pairs searched linearly; an owner
 * holds few row counts (a linear layer at most 79, its row plan's shapes; attention one per length bucket). */
#include "primcache.h"

#include <stdlib.h>

void mq_prim_cache_init(mq_prim_cache *c, size_t entry_size, mq_prim_build_fn build, mq_prim_free_fn free_fn) {
    c->entry_size = entry_size;
    c->build = build;
    c->free = free_fn;
    c->n = c->cap = 0;
    c->rows = NULL;
    c->entries = NULL;
}

void *mq_prim_cache_find(const mq_prim_cache *c, int64_t rows) {
    for (int i = 0; i < c->n; i++)
        if (c->rows[i] == rows) return c->entries[i];
    return NULL;
}

static mq_status grow(mq_prim_cache *c) {
    if (c->n < c->cap) return MQ_OK;
    const int cap = c->cap ? 2 * c->cap : 8;
    int64_t *rows = realloc(c->rows, (size_t)cap * sizeof *rows);
    if (!rows) return mq_set_error(MQ_ERR_NOMEM, "primitive cache: out of memory");
    c->rows = rows;
    void **entries = realloc(c->entries, (size_t)cap * sizeof *entries);
    if (!entries) return mq_set_error(MQ_ERR_NOMEM, "primitive cache: out of memory");
    c->entries = entries;
    c->cap = cap;
    return MQ_OK;
}

mq_status mq_prim_cache_get(mq_prim_cache *c, void *owner, int64_t rows, void **entry) {
    *entry = mq_prim_cache_find(c, rows);
    if (*entry) return MQ_OK;
    MQ_TRY(grow(c));
    void *e = calloc(1, c->entry_size);
    if (!e) return mq_set_error(MQ_ERR_NOMEM, "primitive cache: out of memory");
    mq_status st = c->build(owner, rows, e);
    if (st != MQ_OK) {
        c->free(e);
        free(e);
        return st;
    }
    c->rows[c->n] = rows;
    c->entries[c->n++] = e;
    *entry = e;
    return MQ_OK;
}

void mq_prim_cache_clear(mq_prim_cache *c) {
    for (int i = 0; i < c->n; i++) {
        c->free(c->entries[i]);
        free(c->entries[i]);
    }
    c->n = 0;
}

void mq_prim_cache_release(mq_prim_cache *c) {
    mq_prim_cache_clear(c);
    free(c->rows);
    free(c->entries);
    c->rows = NULL;
    c->entries = NULL;
    c->cap = 0;
}
