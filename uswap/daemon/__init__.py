"""The uswap daemon: fault loop, page table, reclaim, writeback, slots."""
