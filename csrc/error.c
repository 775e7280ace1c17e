/*
 * error.c: names and texts of the error codes, generated from CH_ERROR_MAP.
 * The static asserts keep the X-macro and the enum in chirp_ffi.h in step.
 */
#include "error.h"

#define CH__CHECK(name, value, text) _Static_assert(CH_##name == value, "enum mismatch: " #name);
CH_ERROR_MAP(CH__CHECK)
#undef CH__CHECK

const char *ch_strerror(int code)
{
    switch (code) {
#define CH__TEXT(name, value, text) \
    case value:                     \
        return text;
        CH_ERROR_MAP(CH__TEXT)
#undef CH__TEXT
    default:
        return "unknown error";
    }
}

const char *ch_error_name(int code)
{
    switch (code) {
#define CH__NAME(name, value, text) \
    case value:                     \
        return "CH_" #name;
        CH_ERROR_MAP(CH__NAME)
#undef CH__NAME
    default:
        return NULL;
    }
}

int ch_version_stamp(void) { return CH_VERSION_STAMP; }
