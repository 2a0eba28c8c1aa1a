/* Print sizeof / offsetof of every io-header struct xenpv encodes, one per line:
 *   sizeof <struct> <bytes>
 *   offsetof <struct> <field> <bytes>
 *   ringsize <tag> <buffer bytes> <entries>     (__CONST_RING_SIZE)
 */
#include "xen_abi.h"

#define SZ(T) printf("sizeof %s %zu\n", #T, sizeof(T))
#define OFF(T, F) printf("offsetof %s %s %zu\n", #T, #F, offsetof(T, F))

int main(void)
{
    SZ(struct blkif_request_segment);
    OFF(struct blkif_request_segment, gref);
    OFF(struct blkif_request_segment, first_sect);
    OFF(struct blkif_request_segment, last_sect);

    SZ(struct blkif_request);
    OFF(struct blkif_request, operation);
    OFF(struct blkif_request, nr_segments);
    OFF(struct blkif_request, handle);
    OFF(struct blkif_request, id);
    OFF(struct blkif_request, sector_number);
    OFF(struct blkif_request, seg);
    OFF(struct blkif_request, seg[1]);
    OFF(struct blkif_request, seg[10].last_sect);

    SZ(struct blkif_request_discard);
    OFF(struct blkif_request_discard, operation);
    OFF(struct blkif_request_discard, flag);
    OFF(struct blkif_request_discard, handle);
    OFF(struct blkif_request_discard, id);
    OFF(struct blkif_request_discard, sector_number);
    OFF(struct blkif_request_discard, nr_sectors);

    SZ(struct blkif_request_indirect);
    OFF(struct blkif_request_indirect, operation);
    OFF(struct blkif_request_indirect, indirect_op);
    OFF(struct blkif_request_indirect, nr_segments);
    OFF(struct blkif_request_indirect, id);
    OFF(struct blkif_request_indirect, sector_number);
    OFF(struct blkif_request_indirect, handle);
    OFF(struct blkif_request_indirect, indirect_grefs);
    OFF(struct blkif_request_indirect, indirect_grefs[7]);

    SZ(struct blkif_response);
    OFF(struct blkif_response, id);
    OFF(struct blkif_response, operation);
    OFF(struct blkif_response, status);

    SZ(struct netif_tx_request);
    OFF(struct netif_tx_request, gref);
    OFF(struct netif_tx_request, offset);
    OFF(struct netif_tx_request, flags);
    OFF(struct netif_tx_request, id);
    OFF(struct netif_tx_request, size);

    SZ(struct netif_tx_response);
    OFF(struct netif_tx_response, id);
    OFF(struct netif_tx_response, status);

    SZ(struct netif_rx_request);
    OFF(struct netif_rx_request, id);
    OFF(struct netif_rx_request, gref);

    SZ(struct netif_rx_response);
    OFF(struct netif_rx_response, id);
    OFF(struct netif_rx_response, offset);
    OFF(struct netif_rx_response, flags);
    OFF(struct netif_rx_response, status);

    SZ(struct netif_extra_info);
    OFF(struct netif_extra_info, type);
    OFF(struct netif_extra_info, flags);
    OFF(struct netif_extra_info, u.gso.size);
    OFF(struct netif_extra_info, u.gso.type);
    OFF(struct netif_extra_info, u.gso.features);
    OFF(struct netif_extra_info, u.mcast.addr);
    OFF(struct netif_extra_info, u.hash.type);
    OFF(struct netif_extra_info, u.hash.algorithm);
    OFF(struct netif_extra_info, u.hash.value);

    SZ(union blkif_sring_entry);
    SZ(union netif_tx_sring_entry);
    SZ(union netif_rx_sring_entry);
    OFF(struct blkif_sring, req_prod);
    OFF(struct blkif_sring, req_event);
    OFF(struct blkif_sring, rsp_prod);
    OFF(struct blkif_sring, rsp_event);
    OFF(struct blkif_sring, ring);
    OFF(struct netif_tx_sring, ring);
    OFF(struct netif_rx_sring, ring);

    for (unsigned long pages = 1; pages <= 16; pages++) {
        unsigned long bytes = pages * 4096;
        printf("ringsize blkif %lu %lu\n", bytes, (unsigned long)__CONST_RING_SIZE(blkif, bytes));
        printf("ringsize netif_tx %lu %lu\n", bytes,
               (unsigned long)__CONST_RING_SIZE(netif_tx, bytes));
        printf("ringsize netif_rx %lu %lu\n", bytes,
               (unsigned long)__CONST_RING_SIZE(netif_rx, bytes));
    }
    return 0;
}
