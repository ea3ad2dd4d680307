/* probe.h - the site hook (encoder.h) that calibration and per-layer error reports register: observers fed with
 * every site's input, and copies of every site's output. The forward itself knows nothing of either. */
#ifndef MQ_PROBE_H
#define MQ_PROBE_H

#include "encoder.h"
#include "observer.h"

typedef struct {
    mq_observer **observers; /* n_layers * MQ_SITES_PER_LAYER entries (entries may be NULL), or NULL */
    float **outputs;         /* n_layers * MQ_SITES_PER_LAYER buffers [T, out_features] (entries may be NULL), or NULL */
} mq_site_probe;

/* The hook that feeds `probe` (points: inputs if it has observers, outputs if it has output buffers). The probe must
 * outlive the forward it is passed to. */
mq_site_hook mq_site_probe_hook(mq_site_probe *probe);

#endif
