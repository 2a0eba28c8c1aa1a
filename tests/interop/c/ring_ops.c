/* Run a sequence of ring operations through ring.h's macros; print the outcome of each.
 *
 * stdin, first line:  <tag> <buffer bytes> <fill byte>    tag: blkif | netif_tx | netif_rx
 * then one operation per line:
 *   init             XEN_FRONT_RING_INIT + BACK_RING_INIT
 *   attach <idx>     put a live ring at idx (req_prod = rsp_prod = idx, events idx + 1),
 *                    then FRONT_RING_ATTACH + BACK_RING_ATTACH at idx
 *   req <hex>        front: copy the bytes into RING_GET_REQUEST(req_prod_pvt), req_prod_pvt++
 *   pushreq          RING_PUSH_REQUESTS_AND_CHECK_NOTIFY -> notify
 *   takereq          back: if RING_HAS_UNCONSUMED_REQUESTS, RING_COPY_REQUEST -> hex
 *   finalreq         RING_FINAL_CHECK_FOR_REQUESTS -> work_to_do
 *   rsp <hex>, pushrsp, takersp, finalrsp: the same in the other direction
 * stdout, one line per operation:
 *   <result> free=<RING_FREE_REQUESTS> full=<RING_FULL> ureq=<..UNCONSUMED_REQUESTS>
 *   ursp=<..UNCONSUMED_RESPONSES> consovf=<RING_REQUEST_CONS_OVERFLOW(req_cons)>
 *   f=<req_prod_pvt>,<rsp_cons> b=<req_cons>,<rsp_prod_pvt> crc=<crc32 of the whole buffer>
 */
#include "xen_abi.h"

#define MAX_BYTES (16 * 4096)
static unsigned char mem[MAX_BYTES] __attribute__((aligned(4096)));
static unsigned int size;

static uint32_t crc_table[256];

static uint32_t crc32(const unsigned char *p, size_t n) /* zlib's CRC-32 */
{
    uint32_t c = 0xffffffffu;
    if (!crc_table[1])
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t t = i;
            for (int k = 0; k < 8; k++)
                t = (t >> 1) ^ (0xedb88320u & (0u - (t & 1u)));
            crc_table[i] = t;
        }
    for (size_t i = 0; i < n; i++)
        c = crc_table[(c ^ p[i]) & 0xff] ^ (c >> 8);
    return ~c;
}

static size_t unhex(const char *s, unsigned char *out, size_t max)
{
    size_t n = 0;
    unsigned int byte;
    while (n < max && sscanf(s + 2 * n, "%2x", &byte) == 1)
        out[n++] = byte;
    return n;
}

static void hex(const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        printf("%02x", b[i]);
}

#define RUN(tag)                                                                          \
static int run_##tag(void)                                                                \
{                                                                                         \
    struct tag##_sring *s = (struct tag##_sring *)mem;                                    \
    struct tag##_front_ring f;                                                            \
    struct tag##_back_ring b;                                                             \
    char line[1024], op[32];                                                              \
    unsigned char data[512];                                                              \
    memset(&f, 0, sizeof f);                                                              \
    memset(&b, 0, sizeof b);                                                              \
    while (fgets(line, sizeof line, stdin)) {                                             \
        char arg[1000] = "";                                                              \
        if (sscanf(line, "%31s %999s", op, arg) < 1)                                      \
            continue;                                                                     \
        if (!strcmp(op, "init")) {                                                        \
            XEN_FRONT_RING_INIT(&f, s, size);                                             \
            BACK_RING_INIT(&b, s, size);                                                  \
            printf("-");                                                                  \
        } else if (!strcmp(op, "attach")) {                                               \
            RING_IDX i = strtoul(arg, NULL, 10);                                          \
            s->req_prod = s->rsp_prod = i;                                                \
            s->req_event = s->rsp_event = i + 1;                                          \
            FRONT_RING_ATTACH(&f, s, i, size);                                            \
            BACK_RING_ATTACH(&b, s, i, size);                                             \
            printf("-");                                                                  \
        } else if (!strcmp(op, "req")) {                                                  \
            size_t n = unhex(arg, data, sizeof(f.sring->ring[0].req));                    \
            memcpy(RING_GET_REQUEST(&f, f.req_prod_pvt), data, n);                        \
            f.req_prod_pvt++;                                                             \
            printf("-");                                                                  \
        } else if (!strcmp(op, "rsp")) {                                                  \
            size_t n = unhex(arg, data, sizeof(b.sring->ring[0].rsp));                    \
            memcpy(RING_GET_RESPONSE(&b, b.rsp_prod_pvt), data, n);                       \
            b.rsp_prod_pvt++;                                                             \
            printf("-");                                                                  \
        } else if (!strcmp(op, "pushreq")) {                                              \
            int notify;                                                                   \
            RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&f, notify);                              \
            printf("%d", notify);                                                         \
        } else if (!strcmp(op, "pushrsp")) {                                              \
            int notify;                                                                   \
            RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&b, notify);                             \
            printf("%d", notify);                                                         \
        } else if (!strcmp(op, "takereq")) {                                              \
            if (RING_HAS_UNCONSUMED_REQUESTS(&b)) {                                       \
                __typeof__(b.sring->ring[0].req) r;                                       \
                RING_COPY_REQUEST(&b, b.req_cons, &r);                                    \
                b.req_cons++;                                                             \
                hex(&r, sizeof r);                                                        \
            } else {                                                                      \
                printf("none");                                                           \
            }                                                                             \
        } else if (!strcmp(op, "takersp")) {                                              \
            if (RING_HAS_UNCONSUMED_RESPONSES(&f)) {                                      \
                __typeof__(f.sring->ring[0].rsp) r;                                       \
                RING_COPY_RESPONSE(&f, f.rsp_cons, &r);                                   \
                f.rsp_cons++;                                                             \
                hex(&r, sizeof r);                                                        \
            } else {                                                                      \
                printf("none");                                                           \
            }                                                                             \
        } else if (!strcmp(op, "finalreq")) {                                             \
            int work;                                                                     \
            RING_FINAL_CHECK_FOR_REQUESTS(&b, work);                                      \
            printf("%d", !!work);                                                         \
        } else if (!strcmp(op, "finalrsp")) {                                             \
            int work;                                                                     \
            RING_FINAL_CHECK_FOR_RESPONSES(&f, work);                                     \
            printf("%d", !!work);                                                         \
        } else {                                                                          \
            printf("unknown op %s\n", op);                                                \
            return 1;                                                                     \
        }                                                                                 \
        printf(" free=%u full=%d ureq=%u ursp=%u consovf=%d f=%u,%u b=%u,%u crc=%08x\n",  \
               (unsigned)RING_FREE_REQUESTS(&f), (int)RING_FULL(&f),                      \
               (unsigned)RING_HAS_UNCONSUMED_REQUESTS(&b),                                \
               (unsigned)RING_HAS_UNCONSUMED_RESPONSES(&f),                               \
               (int)RING_REQUEST_CONS_OVERFLOW(&b, b.req_cons), f.req_prod_pvt,           \
               f.rsp_cons, b.req_cons, b.rsp_prod_pvt, crc32(mem, size));                 \
    }                                                                                     \
    return 0;                                                                             \
}

RUN(blkif)
RUN(netif_tx)
RUN(netif_rx)

int main(void)
{
    char tag[32];
    unsigned int fill;
    if (scanf("%31s %u %u\n", tag, &size, &fill) != 3 || size > MAX_BYTES)
        return 2;
    memset(mem, fill, size);
    if (!strcmp(tag, "blkif"))
        return run_blkif();
    if (!strcmp(tag, "netif_tx"))
        return run_netif_tx();
    if (!strcmp(tag, "netif_rx"))
        return run_netif_rx();
    return 2;
}
