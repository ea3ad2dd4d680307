/* probe.c - observers and output copies behind one site hook (probe.h). */
#include "probe.h"

#include <string.h>

static mq_status probe_site(void *user, int layer, int site, mq_site_point point, const float *x, int64_t rows,
                            int64_t cols) {
    const mq_site_probe *p = user;
    const int64_t i = (int64_t)layer * MQ_SITES_PER_LAYER + site;
    if (point == MQ_SITE_INPUT && p->observers && p->observers[i])
        return mq_observer_update_matrix(p->observers[i], x, (size_t)rows, (size_t)cols);
    if (point == MQ_SITE_OUTPUT && p->outputs && p->outputs[i])
        memcpy(p->outputs[i], x, (size_t)rows * (size_t)cols * sizeof(float));
    return MQ_OK;
}

mq_site_hook mq_site_probe_hook(mq_site_probe *probe) {
    const unsigned points = (probe->observers ? MQ_SITE_INPUT : 0u) | (probe->outputs ? MQ_SITE_OUTPUT : 0u);
    return (mq_site_hook){points ? probe_site : NULL, probe, points};
}
