/* QEMU's declarations first, then ours: must compile with -Wall -Wextra -Werror, and the
 * layouts and values QEMU relies on must match. */
#include "qemu_side.h"
#include "postcopy-ram.h"
#include "seed_functions.h"

#include <stddef.h>
#include <stdio.h>

_Static_assert(sizeof(struct PostCopyFD) == 40, "PostCopyFD is 40 bytes on LP64");
_Static_assert(offsetof(struct PostCopyFD, data) == 8, "PostCopyFD.data");
_Static_assert(offsetof(struct PostCopyFD, idstr) == 32, "PostCopyFD.idstr");
_Static_assert(sizeof(NotifierWithReturn) == 24, "NotifierWithReturn is 24 bytes");
_Static_assert(sizeof(struct PostcopyNotifyData) == 4, "PostcopyNotifyData is 4 bytes");
_Static_assert(POSTCOPY_INCOMING_END == 5, "PostcopyState values");
_Static_assert(POSTCOPY_NOTIFY_INBOUND_END == 3, "PostcopyNotifyReason values");
_Static_assert(RAM_CHANNEL_MAX == 2, "PostcopyChannels values");

int main(void)
{
    int n = 0;
#define COUNT(f) n += ((void *)f != NULL);
    SEED_FUNCTIONS(COUNT)
    printf("conformance_qemu: %d seed functions linked\n", n);
    return n == 28 ? 0 : 1;
}
