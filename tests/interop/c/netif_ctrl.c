/* The netif control ring against io/netif.h: layout, constants, encodings and the header's
 * own Toeplitz hash (XEN_NETIF_DEFINE_TOEPLITZ).
 *
 * Prints, before reading anything:
 *   sizeof <struct> <bytes> / offsetof <struct> <field> <bytes> / ringsize <bytes> <entries>
 *   const <NAME> <value>
 * then answers stdin lines, one output line each:
 *   req <id> <type> <d0> <d1> <d2>      -> hex of struct xen_netif_ctrl_request
 *   rsp <id> <type> <status> <data>     -> hex of struct xen_netif_ctrl_response
 *   hash <key hex|-> <data hex>         -> xen_netif_toeplitz_hash as a decimal
 */
#define XEN_NETIF_DEFINE_TOEPLITZ
#include "xen_abi.h"

#define SZ(T) printf("sizeof %s %zu\n", #T, sizeof(T))
#define OFF(T, F) printf("offsetof %s %s %zu\n", #T, #F, offsetof(T, F))
#define CONST(N) printf("const %s %lu\n", #N, (unsigned long)(N))

static void hex(const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        printf("%02x", b[i]);
    printf("\n");
}

static size_t unhex(const char *s, uint8_t *out, size_t max)
{
    size_t n = 0;
    if (strcmp(s, "-") == 0)
        return 0;
    while (s[0] && s[1] && n < max) {
        unsigned int v;
        if (sscanf(s, "%2x", &v) != 1)
            exit(2);
        out[n++] = (uint8_t)v;
        s += 2;
    }
    return n;
}

int main(void)
{
    SZ(struct xen_netif_ctrl_request);
    OFF(struct xen_netif_ctrl_request, id);
    OFF(struct xen_netif_ctrl_request, type);
    OFF(struct xen_netif_ctrl_request, data);
    OFF(struct xen_netif_ctrl_request, data[1]);
    OFF(struct xen_netif_ctrl_request, data[2]);
    SZ(struct xen_netif_ctrl_response);
    OFF(struct xen_netif_ctrl_response, id);
    OFF(struct xen_netif_ctrl_response, type);
    OFF(struct xen_netif_ctrl_response, status);
    OFF(struct xen_netif_ctrl_response, data);
    SZ(union xen_netif_ctrl_sring_entry);
    OFF(struct xen_netif_ctrl_sring, ring);
    printf("ringsize 4096 %lu\n", (unsigned long)__CONST_RING_SIZE(xen_netif_ctrl, 4096));
    printf("ringsize 16384 %lu\n", (unsigned long)__CONST_RING_SIZE(xen_netif_ctrl, 16384));

    CONST(XEN_NETIF_CTRL_TYPE_INVALID);
    CONST(XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS);
    CONST(XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS);
    CONST(XEN_NETIF_CTRL_TYPE_SET_HASH_KEY);
    CONST(XEN_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE);
    CONST(XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE);
    CONST(XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING);
    CONST(XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM);
    CONST(XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE);
    CONST(XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING);
    CONST(XEN_NETIF_CTRL_TYPE_DEL_GREF_MAPPING);
    CONST(XEN_NETIF_CTRL_STATUS_SUCCESS);
    CONST(XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED);
    CONST(XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER);
    CONST(XEN_NETIF_CTRL_STATUS_BUFFER_OVERFLOW);
    CONST(XEN_NETIF_CTRL_HASH_TYPE_IPV4);
    CONST(XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP);
    CONST(XEN_NETIF_CTRL_HASH_TYPE_IPV6);
    CONST(XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP);
    CONST(XEN_NETIF_CTRL_HASH_ALGORITHM_NONE);
    CONST(XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ);
    printf("end\n");
    fflush(stdout);

    char line[4096], kind[8], a[1024], b[2048];
    while (fgets(line, sizeof line, stdin)) {
        unsigned long v[5];
        if (sscanf(line, "req %lu %lu %lu %lu %lu", &v[0], &v[1], &v[2], &v[3], &v[4]) == 5) {
            struct xen_netif_ctrl_request r;
            memset(&r, 0, sizeof r);
            r.id = (uint16_t)v[0];
            r.type = (uint16_t)v[1];
            r.data[0] = (uint32_t)v[2];
            r.data[1] = (uint32_t)v[3];
            r.data[2] = (uint32_t)v[4];
            hex(&r, sizeof r);
        } else if (sscanf(line, "rsp %lu %lu %lu %lu", &v[0], &v[1], &v[2], &v[3]) == 4) {
            struct xen_netif_ctrl_response r;
            memset(&r, 0, sizeof r);
            r.id = (uint16_t)v[0];
            r.type = (uint16_t)v[1];
            r.status = (uint32_t)v[2];
            r.data = (uint32_t)v[3];
            hex(&r, sizeof r);
        } else if (sscanf(line, "%7s %1023s %2047s", kind, a, b) == 3 && !strcmp(kind, "hash")) {
            uint8_t key[512], data[1024];
            size_t keylen = unhex(a, key, sizeof key), datalen = unhex(b, data, sizeof data);
            printf("%u\n", xen_netif_toeplitz_hash(key, keylen, data, datalen));
        } else {
            return 2;
        }
    }
    return 0;
}
