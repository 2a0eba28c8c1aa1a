/* Encode io-header structs from field values read on stdin; print each struct as hex.
 *
 * One record per line: a kind, then decimal field values (see the cases below). The struct
 * is zeroed first, the fields are assigned through the header's own types, and all
 * sizeof(struct) bytes are printed, so padding and field widths come from the compiler.
 */
#include "xen_abi.h"

static void hex(const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        printf("%02x", b[i]);
    printf("\n");
}

static unsigned long long v[64]; /* "%llu" also takes -1 (wraps, like the C assignment) */

int main(void)
{
    char line[4096], kind[32];
    while (fgets(line, sizeof line, stdin)) {
        int n = 0, used = 0;
        char *p = line;
        if (sscanf(p, "%31s%n", kind, &used) != 1)
            continue;
        p += used;
        while (n < 64 && sscanf(p, "%llu%n", &v[n], &used) == 1) {
            p += used;
            n++;
        }
        if (!strcmp(kind, "rw")) { /* op nr_segments handle id sector (gref first last)* */
            struct blkif_request r;
            memset(&r, 0, sizeof r);
            r.operation = v[0];
            r.nr_segments = v[1];
            r.handle = v[2];
            r.id = v[3];
            r.sector_number = v[4];
            for (int i = 0; i < (int)v[1] && i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++) {
                r.seg[i].gref = v[5 + 3 * i];
                r.seg[i].first_sect = v[6 + 3 * i];
                r.seg[i].last_sect = v[7 + 3 * i];
            }
            hex(&r, sizeof r);
        } else if (!strcmp(kind, "discard")) { /* flag handle id sector nr_sectors */
            struct blkif_request_discard r;
            memset(&r, 0, sizeof r);
            r.operation = BLKIF_OP_DISCARD;
            r.flag = v[0];
            r.handle = v[1];
            r.id = v[2];
            r.sector_number = v[3];
            r.nr_sectors = v[4];
            hex(&r, sizeof r);
        } else if (!strcmp(kind, "indirect")) { /* indirect_op nr id sector handle grefs[8] */
            struct blkif_request_indirect r;
            memset(&r, 0, sizeof r);
            r.operation = BLKIF_OP_INDIRECT;
            r.indirect_op = v[0];
            r.nr_segments = v[1];
            r.id = v[2];
            r.sector_number = v[3];
            r.handle = v[4];
            for (int i = 0; i < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; i++)
                r.indirect_grefs[i] = v[5 + i];
            hex(&r, sizeof r);
        } else if (!strcmp(kind, "segment")) { /* gref first last */
            struct blkif_request_segment s;
            memset(&s, 0, sizeof s);
            s.gref = v[0];
            s.first_sect = v[1];
            s.last_sect = v[2];
            hex(&s, sizeof s);
        } else if (!strcmp(kind, "rsp")) { /* id operation status */
            struct blkif_response r;
            memset(&r, 0, sizeof r);
            r.id = v[0];
            r.operation = v[1];
            r.status = v[2];
            hex(&r, sizeof r);
        } else if (!strcmp(kind, "txreq")) { /* gref offset flags id size */
            struct netif_tx_request r;
            memset(&r, 0, sizeof r);
            r.gref = v[0];
            r.offset = v[1];
            r.flags = v[2];
            r.id = v[3];
            r.size = v[4];
            hex(&r, sizeof r);
        } else if (!strcmp(kind, "txrsp")) { /* id status */
            struct netif_tx_response r;
            memset(&r, 0, sizeof r);
            r.id = v[0];
            r.status = v[1];
            hex(&r, sizeof r);
        } else if (!strcmp(kind, "rxreq")) { /* id gref */
            struct netif_rx_request r;
            memset(&r, 0, sizeof r);
            r.id = v[0];
            r.gref = v[1];
            hex(&r, sizeof r);
        } else if (!strcmp(kind, "rxrsp")) { /* id offset flags status */
            struct netif_rx_response r;
            memset(&r, 0, sizeof r);
            r.id = v[0];
            r.offset = v[1];
            r.flags = v[2];
            r.status = v[3];
            hex(&r, sizeof r);
        } else if (!strcmp(kind, "gso")) { /* flags size type features */
            struct netif_extra_info e;
            memset(&e, 0, sizeof e);
            e.type = XEN_NETIF_EXTRA_TYPE_GSO;
            e.flags = v[0];
            e.u.gso.size = v[1];
            e.u.gso.type = v[2];
            e.u.gso.features = v[3];
            hex(&e, sizeof e);
        } else if (!strcmp(kind, "mcast")) { /* type flags addr[6] */
            struct netif_extra_info e;
            memset(&e, 0, sizeof e);
            e.type = v[0];
            e.flags = v[1];
            for (int i = 0; i < 6; i++)
                e.u.mcast.addr[i] = v[2 + i];
            hex(&e, sizeof e);
        } else if (!strcmp(kind, "hash")) { /* flags htype algorithm value */
            struct netif_extra_info e;
            uint32_t value = v[3];
            memset(&e, 0, sizeof e);
            e.type = XEN_NETIF_EXTRA_TYPE_HASH;
            e.flags = v[0];
            e.u.hash.type = v[1];
            e.u.hash.algorithm = v[2];
            for (int i = 0; i < 4; i++) /* "LSB ---- value ---- MSB" */
                e.u.hash.value[i] = value >> (8 * i);
            hex(&e, sizeof e);
        } else {
            printf("unknown kind %s\n", kind);
            return 1;
        }
    }
    return 0;
}
