/* Only our header: everything a C VMM needs must be declared by it. */
#include "postcopy-ram.h"
#include "seed_functions.h"

#include <stddef.h>
#include <stdio.h>

_Static_assert(sizeof(struct PostCopyFD) == 40, "PostCopyFD is 40 bytes on LP64");
_Static_assert(sizeof(NotifierWithReturn) == 24, "NotifierWithReturn is 24 bytes");
_Static_assert(MIGRATION_STATUS_POSTCOPY_PAUSED == 6, "seed numbering");
_Static_assert(MIGRATION_STATUS_POSTCOPY_RECOVER_SETUP == 7, "seed numbering");
_Static_assert(sizeof(PostcopyPageRequest) == 32, "request record is 32 bytes");

int main(void)
{
    int n = 0;
#define COUNT(f) n += ((void *)f != NULL);
    SEED_FUNCTIONS(COUNT)
    printf("conformance_standalone: %d seed functions linked\n", n);
    return n == 28 ? 0 : 1;
}
