"""Grant table constants, named and valued as in /usr/include/xen/grant_table.h."""

from __future__ import annotations

import enum


class GNTST(enum.IntEnum):
    """Grant operation status codes."""

    GNTST_okay = 0
    GNTST_general_error = -1
    GNTST_bad_domain = -2
    GNTST_bad_gntref = -3
    GNTST_bad_handle = -4
    GNTST_bad_virt_addr = -5
    GNTST_bad_dev_addr = -6
    GNTST_no_device_space = -7
    GNTST_permission_denied = -8
    GNTST_bad_page = -9
    GNTST_bad_copy_arg = -10
    GNTST_address_too_big = -11
    GNTST_eagain = -12
    GNTST_no_space = -13


class GTF(enum.IntFlag):
    """Grant entry v1 flags (the `flags` u16 of `struct grant_entry_v1`)."""

    GTF_invalid = 0
    GTF_permit_access = 1 << 0
    GTF_accept_transfer = 2 << 0
    GTF_transitive = 3 << 0
    GTF_type_mask = 3 << 0
    GTF_readonly = 1 << 2
    GTF_reading = 1 << 3
    GTF_writing = 1 << 4
    GTF_PWT = 1 << 5
    GTF_PCD = 1 << 6
    GTF_PAT = 1 << 7
    GTF_sub_page = 1 << 8


# The codes the hot paths compare, as plain ints (cheaper to compare than enum members).
OK = int(GNTST.GNTST_okay)
GENERAL = int(GNTST.GNTST_general_error)
BAD_GNTREF = int(GNTST.GNTST_bad_gntref)
BAD_COPY = int(GNTST.GNTST_bad_copy_arg)
PERMIT = int(GTF.GTF_permit_access)
TYPE_MASK = int(GTF.GTF_type_mask)
READONLY = int(GTF.GTF_readonly)
READING = int(GTF.GTF_reading)
WRITING = int(GTF.GTF_writing)

# xenpv extension (docs/granule-extension.md): the granule order of a grant (2**order
# contiguous 4 KiB frames) lives in bits 12..14 of `flags`, which v1 leaves unused. Order 0
# (the only order Xen knows) leaves the entry byte-exact with grant_entry_v1.
XENPV_GTF_ORDER_SHIFT = 12
XENPV_GTF_ORDER_MASK = 0x7 << XENPV_GTF_ORDER_SHIFT
MAX_GRANULE_ORDER = 4

# Linux reserves the first 8 grant references for the toolstack (console, xenstore rings).
GNTTAB_NR_RESERVED_ENTRIES = 8
DOMID_FIRST_RESERVED = 0x7FF0
