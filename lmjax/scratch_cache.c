/* Keeps large aligned allocations mapped after they are freed, for the next request of the
 * same size. Loaded with LD_PRELOAD by lmjax.scratch_cache (see there for why).
 *
 * XLA:CPU allocates each executable's scratch memory with posix_memalign at every run and
 * frees it at the end. glibc serves blocks this large with a fresh mmap and returns them with
 * munmap, so the kernel faults in and zeroes every page again at every training step. Here a
 * freed block of at least MIN_BYTES stays mapped (pages resident) and is handed back to the
 * next posix_memalign of the same rounded size. Everything else goes to glibc unchanged.
 *
 * Memory: one block of each size stays cached. A freed block is unmapped if an idle one of
 * its size is kept, or if a second one was mapped because it was still in use when a run asked
 * for its size (two runs overlapped: the newer block takes over). A request that finds no idle
 * block of its size first unmaps every idle block. So blocks stay cached only while the program
 * keeps asking for the same sizes (a training loop running one step after another); idle
 * blocks are released at the first request of a size none of them has.
 * Only posix_memalign is intercepted (what XLA uses); its blocks are released with free(),
 * never realloc().
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <time.h>

extern void *__libc_memalign(size_t alignment, size_t size);
extern void __libc_free(void *ptr);

#define MIN_BYTES ((size_t)4 << 20)
#define PAGE ((size_t)4096)
#define SLOTS 1024 /* live blocks tracked: parameters and optimizer moments take slots too */
#define WAIT_MIN_BYTES ((size_t)64 << 20)
#define WAIT_US 2000
#define WAIT_STEP_US 50

struct block {
    void *_Atomic ptr; /* NULL: slot empty; read without the lock by free() */
    size_t bytes;
    int in_use;
    int recycled; /* freed and handed out again at least once: a per-run buffer, not an array */
    int overflow; /* mapped while another block of its size was in use: it takes over */
};

static struct block blocks[SLOTS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static int from_libc(void **out, size_t alignment, size_t size) {
    void *p = __libc_memalign(alignment, size);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}

/* Held across fork(), so that a forked child (data workers) never inherits it locked. */
static void lock_for_fork(void) { pthread_mutex_lock(&lock); }
static void unlock_after_fork(void) { pthread_mutex_unlock(&lock); }
__attribute__((constructor)) static void install_fork_handlers(void) {
    pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork);
}

/* Unmaps every idle block. Called with the lock held (a miss: the program changed sizes). */
static void unmap_idle(void) {
    for (int i = 0; i < SLOTS; i++)
        if (blocks[i].ptr && !blocks[i].in_use) {
            void *p = blocks[i].ptr;
            atomic_store(&blocks[i].ptr, NULL);  /* before munmap: the kernel may reuse the range at once */
            munmap(p, blocks[i].bytes);
        }
}

int posix_memalign(void **out, size_t alignment, size_t size) {
    if (alignment < sizeof(void *) || (alignment & (alignment - 1))) return EINVAL;
    if (size < MIN_BYTES || alignment > PAGE) return from_libc(out, alignment, size);
    size_t bytes = (size + PAGE - 1) & ~(PAGE - 1);

    /* A run started right after another can ask for its scratch while the first is still
     * freeing the same size: for blocks of WAIT_MIN_BYTES and more (a step's scratch; its
     * faults cost far more than the wait), wait up to WAIT_US for a recycled block of that size
     * in use rather than mapping a second one. Arrays that were never freed are not waited for. */
    int busy_twin, busy_recycled;
    for (int waited = 0;; waited += WAIT_STEP_US) {
        busy_twin = busy_recycled = 0;
        pthread_mutex_lock(&lock);
        for (int i = 0; i < SLOTS; i++)
            if (blocks[i].ptr && blocks[i].bytes == bytes) {
                if (!blocks[i].in_use) {
                    blocks[i].in_use = 1;
                    *out = blocks[i].ptr;
                    pthread_mutex_unlock(&lock);
                    return 0;
                }
                busy_twin = 1;
                busy_recycled |= blocks[i].recycled;
            }
        if (!busy_recycled || bytes < WAIT_MIN_BYTES || waited >= WAIT_US) break;  /* leaves the lock held */
        pthread_mutex_unlock(&lock);
        nanosleep(&(struct timespec){.tv_nsec = WAIT_STEP_US * 1000}, NULL);
    }
    unmap_idle();
    int slot = -1;
    for (int i = 0; i < SLOTS && slot < 0; i++)
        if (!blocks[i].ptr) slot = i;
    if (slot >= 0) {
        blocks[slot].bytes = bytes;
        blocks[slot].in_use = 1;
        blocks[slot].recycled = 0;
        blocks[slot].overflow = busy_twin;
        blocks[slot].ptr = MAP_FAILED;  /* reserved; free() never sees this address */
    }
    pthread_mutex_unlock(&lock);
    if (slot < 0) return from_libc(out, alignment, size);  /* every slot holds a live block */

    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    atomic_store(&blocks[slot].ptr, p == MAP_FAILED ? NULL : p);
    if (p == MAP_FAILED) return ENOMEM;
    *out = p;
    return 0;
}

void free(void *ptr) {
    if (ptr && ((uintptr_t)ptr & (PAGE - 1)) == 0) {  /* ours are page-aligned: skip the rest fast */
        for (int i = 0; i < SLOTS; i++)
            if (atomic_load(&blocks[i].ptr) == ptr) {
                pthread_mutex_lock(&lock);
                blocks[i].in_use = 0;
                blocks[i].recycled = 1;
                blocks[i].overflow = 0;
                size_t bytes = blocks[i].bytes;
                int twin = 0;  /* an idle block of this size, or one that took over from this one */
                for (int j = 0; j < SLOTS; j++)
                    if (j != i && blocks[j].ptr && blocks[j].bytes == bytes && (!blocks[j].in_use || blocks[j].overflow))
                        twin = 1;
                if (twin) atomic_store(&blocks[i].ptr, NULL);  /* one block per size stays cached */
                pthread_mutex_unlock(&lock);
                if (twin) munmap(ptr, bytes);
                return;
            }
    }
    __libc_free(ptr);
}
