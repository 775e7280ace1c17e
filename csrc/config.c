/*
 * config.c: start-up validation of a node configuration (docs/config.md).
 *
 * The checks run in the reference order and keep the reference message
 * prefixes (existing programs match them), but every message names the
 * Config field and its limit and shows the offending value. The reference's
 * wrong wording (DH check naming the cert path, "max slots must be <= 1") is
 * fixed after the prefix. Effective values: R = max(REUSE_TIME, 3 * TIMEOUT);
 * synchronous mode forces one slot, asynchronous mode turns 0 into 16;
 * MAX_CONNECTIONS 0 follows the file descriptor limit.
 */
#include <stdarg.h>
#include <stdio.h>
#include <sys/resource.h>
#include <unistd.h>

#include "core.h"

static int ch__cfg_fail(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int ch__cfg_fail(char *err, size_t errlen, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -CH_VALUE_ERROR;
}

double ch__config_reuse(const ch_config_t *cfg)
{
    double r = cfg->reuse_time;
    if (r < 3 * cfg->timeout)
        r = 3 * cfg->timeout;
    return r;
}

int ch__config_slots(const ch_config_t *cfg)
{
    /* libchirp 1.x forces one slot in synchronous mode; we honour an explicit
     * MAX_SLOTS there too (0 keeps the 1.x default of one), so a receiver can
     * work on several acknowledged messages at once. */
    if (cfg->max_slots == 0)
        return cfg->synchronous ? 1 : 16;
    return cfg->max_slots;
}

/* The effective connection limit: the soft limit of file descriptors (at
 * node start) less a reserve for listeners, the loop, outgoing connections
 * and the application (a quarter of the limit, at most 64), or
 * MAX_CONNECTIONS if that is lower. */
uint32_t ch__config_max_conns(const ch_config_t *cfg)
{
    uint32_t fds = CH__MAX_CONNECTIONS;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        rl.rlim_cur < CH__MAX_CONNECTIONS) {
        rlim_t reserve = rl.rlim_cur / 4 < 64 ? rl.rlim_cur / 4 : 64;
        fds = rl.rlim_cur > reserve ? (uint32_t)(rl.rlim_cur - reserve) : 1;
    }
    if (cfg->max_connections && cfg->max_connections < fds)
        return cfg->max_connections;
    return fds;
}

int ch_config_check(const ch_config_t *cfg, char *err, size_t errlen)
{
    if (err && errlen)
        err[0] = 0;
    if (!cfg->disable_encryption) {
        if (!cfg->dh_params_pem || !cfg->dh_params_pem[0])
            return ch__cfg_fail(err, errlen,
                                "Config: DH_PARAMS_PEM must be set. (or set DISABLE_ENCRYPTION)");
        if (!cfg->cert_chain_pem || !cfg->cert_chain_pem[0])
            return ch__cfg_fail(err, errlen,
                                "Config: CERT_CHAIN_PEM must be set. (or set DISABLE_ENCRYPTION)");
        if (access(cfg->cert_chain_pem, R_OK) != 0)
            return ch__cfg_fail(err, errlen, "Config: cert %s does not exist. (CERT_CHAIN_PEM)",
                                cfg->cert_chain_pem);
        if (access(cfg->dh_params_pem, R_OK) != 0)
            return ch__cfg_fail(err, errlen, "Config: DH params %s does not exist. (DH_PARAMS_PEM)",
                                cfg->dh_params_pem);
    }
    if (cfg->port != 0 && cfg->port <= 1024)
        return ch__cfg_fail(err, errlen,
                            "Config: port must be > 1024, or 0 for a free port. (PORT = %u)",
                            cfg->port);
    if (cfg->backlog >= 128)
        return ch__cfg_fail(err, errlen, "Config: backlog must be < 128. (BACKLOG = %u)",
                            cfg->backlog);
    if (!(cfg->timeout <= 1200))
        return ch__cfg_fail(err, errlen, "Config: timeout must be <= 1200. (TIMEOUT = %g)",
                            cfg->timeout);
    if (!(cfg->timeout >= 0.1))
        return ch__cfg_fail(err, errlen, "Config: timeout must be >= 0.1. (TIMEOUT = %g)",
                            cfg->timeout);
    double r = ch__config_reuse(cfg);
    if (!(r >= 0.5))
        return ch__cfg_fail(err, errlen,
                            "Config: resuse time must be => 0.5. (must be >= 0.5; REUSE_TIME = %g, effective "
                            "max(REUSE_TIME, 3 * TIMEOUT) = %g)",
                            cfg->reuse_time, r);
    if (!(r <= 3600))
        return ch__cfg_fail(err, errlen,
                            "Config: resuse time must be <= 3600. (REUSE_TIME = %g, effective "
                            "max(REUSE_TIME, 3 * TIMEOUT) = %g)",
                            cfg->reuse_time, r);
    if (cfg->max_slots > 32)
        return ch__cfg_fail(err, errlen, "Config: max slots must be <= 32. (MAX_SLOTS = %u)",
                            cfg->max_slots);
    if (cfg->buffer_size != 0 && cfg->buffer_size < 1024)
        return ch__cfg_fail(err, errlen,
                            "Config: buffer size must be >= 1024 or 0 for the default. "
                            "(BUFFER_SIZE = %u)",
                            cfg->buffer_size);
    if (cfg->max_msg_size == 0)
        return ch__cfg_fail(err, errlen, "Config: max message size must be > 0. (MAX_MSG_SIZE = 0)");
    if (cfg->max_connections > CH__MAX_CONNECTIONS)
        return ch__cfg_fail(err, errlen,
                            "Config: max connections must be <= %u or 0 for the fd limit. "
                            "(MAX_CONNECTIONS = %u)",
                            CH__MAX_CONNECTIONS, cfg->max_connections);
    if (cfg->max_connections_per_address > CH__MAX_CONNECTIONS ||
        (cfg->max_connections &&
         cfg->max_connections_per_address > cfg->max_connections))
        return ch__cfg_fail(err, errlen,
                            "Config: max connections per address must be <= MAX_CONNECTIONS "
                            "(%u) and <= %u. (MAX_CONNECTIONS_PER_ADDRESS = %u)",
                            cfg->max_connections ? cfg->max_connections : CH__MAX_CONNECTIONS,
                            CH__MAX_CONNECTIONS, cfg->max_connections_per_address);
    return CH_SUCCESS;
}
