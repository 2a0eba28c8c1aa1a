/* Include the installed Xen io headers, natively or with the x86_32 ABI's packing.
 *
 * Built with -DXENPV_X86_32 the header structs are laid out under #pragma pack(4), which is
 * how a 32-bit x86 guest lays them out (uint64_t aligned to 4; Linux blkback and QEMU define
 * blkif_x86_32_* the same way). The one difference from a real i386 build: the header's
 * `#ifdef __i386__` pad at the end of blkif_request_indirect (56 -> 64 bytes) is absent.
 */
#ifndef XENPV_TEST_XEN_ABI_H
#define XENPV_TEST_XEN_ABI_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ring.h's barriers (it maps xen_mb() to mb() for the default interface version) */
#define mb() __sync_synchronize()
#define rmb() __sync_synchronize()
#define wmb() __sync_synchronize()

#ifdef XENPV_X86_32
#pragma pack(push, 4)
#endif
#include <xen/io/blkif.h>
#include <xen/io/netif.h>
#ifdef XENPV_X86_32
#pragma pack(pop)
#endif

#endif
