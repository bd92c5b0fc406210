/* Negative control for the helgrind test: two threads bump a counter without a lock.
 * Helgrind must report it, or a clean run of the library's harnesses proves nothing. */
#include <pthread.h>
#include <stdio.h>

static long unguarded;

static void *bump(void *arg)
{
    (void)arg;
    for (int i = 0; i < 1000; i++)
        unguarded++;
    return NULL;
}

int main(void)
{
    pthread_t a, b;
    pthread_create(&a, NULL, bump, NULL);
    pthread_create(&b, NULL, bump, NULL);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    printf("helgrind_control: counter %ld\n", unguarded);
    return 0;
}
