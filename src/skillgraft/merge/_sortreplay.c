/* The replay of libstdc++'s std::sort behind skillgraft.merge.sortpath (see its docstring for why the entries it
 * puts at ranks [start, stop) are exactly the real sort's).
 *
 * Built as an extension module with no methods (so every platform's build links it); sortpath calls
 * sg_rank_mask through ctypes, which releases the GIL for the call. Plain C99, no Python API beyond PyInit.
 *
 * Keys are float32 bit patterns: a bf16 value is its 16 bits shifted up (exactly .float()), |x| clears the sign
 * bit and -x flips it (exactly abs and neg), so one pass reads the delta in its own dtype and writes the keys the
 * sort compares; comparisons are float comparisons, as the sort's. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define THRESHOLD 16 /* libstdc++'s _S_threshold: parts this small are left to the final insertion sort */
#define BLOCK 256    /* entries scanned at a time per side of a partition (the stop buffers' size) */

typedef int32_t ix_t;

static inline uint32_t key_bits(const void *src, int64_t j, int bf16, int magnitude, int negate) {
    uint32_t b = bf16 ? (uint32_t)((const uint16_t *)src)[j] << 16 : ((const uint32_t *)src)[j];
    if (magnitude) b &= 0x7FFFFFFFu;
    if (negate) b ^= 0x80000000u;
    return b;
}

static inline float as_float(uint32_t b) {
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static inline void swap2(float *key, ix_t *idx, int64_t a, int64_t b) {
    float k = key[a];
    key[a] = key[b];
    key[b] = k;
    ix_t x = idx[a];
    idx[a] = idx[b];
    idx[b] = x;
}

/* libstdc++ __move_median_to_first(lo, lo+1, mid, hi-1) */
static void median_to_first(float *key, ix_t *idx, int64_t lo, int64_t hi) {
    int64_t a = lo + 1, b = lo + (hi - lo) / 2, c = hi - 1, s;
    if (key[a] < key[b]) {
        if (key[b] < key[c]) s = b;
        else if (key[a] < key[c]) s = c;
        else s = a;
    } else if (key[a] < key[c]) s = a;
    else if (key[b] < key[c]) s = c;
    else s = b;
    swap2(key, idx, lo, s);
}

/* libstdc++ __unguarded_partition_pivot on [lo, hi) with comp = "<"; returns the cut.
 *
 * Hoare's loop swaps its i-th left stop (key >= pivot, ascending) with its i-th right stop (key <= pivot,
 * descending) while the left one is before the right one. Block phase: blocks are scanned branch-free from both
 * ends into the stop buffers and the buffered pairs swapped at once, as long as the left region scanned,
 * [lo+1, i), and the right one, (j, hi-1], stay apart: then every buffered left stop is before every buffered
 * right stop, no scanned entry has been moved by the other side, and the pairs are Hoare's own, swapped in his
 * order. With less than a block between the regions, Hoare's loop itself finishes from the state after the last
 * swap (scanning again at most about three blocks). */
static int64_t partition(float *key, ix_t *idx, int64_t lo, int64_t hi) {
    int64_t lbuf[BLOCK], rbuf[BLOCK];
    median_to_first(key, idx, lo, hi);
    const float p = key[lo];
    int64_t i = lo + 1, j = hi - 1, nl = 0, nr = 0, pl = 0, pr = 0, first = lo + 1, last = hi;
    for (;;) {
        if (pl == nl) {
            if (j - i + 1 < BLOCK) break;
            nl = pl = 0;
            for (int64_t q = i; q < i + BLOCK; q++) {
                lbuf[nl] = q;
                nl += !(key[q] < p);
            }
            i += BLOCK;
        }
        if (pr == nr) {
            if (j - i + 1 < BLOCK) break;
            nr = pr = 0;
            for (int64_t q = j; q > j - BLOCK; q--) {
                rbuf[nr] = q;
                nr += !(p < key[q]);
            }
            j -= BLOCK;
        }
        int64_t m = nl - pl < nr - pr ? nl - pl : nr - pr;
        if (m > 0) {
            for (int64_t t = 0; t < m; t++) swap2(key, idx, lbuf[pl + t], rbuf[pr + t]);
            pl += m;
            pr += m;
            first = lbuf[pl - 1] + 1;
            last = rbuf[pr - 1];
        }
    }
    for (;;) { /* Hoare's loop, unguarded: the pivot at lo and the median rule stop both scans */
        while (key[first] < p) first++;
        last--;
        while (p < key[last]) last--;
        if (!(first < last)) return first;
        swap2(key, idx, first, last);
        first++;
    }
}

/* Marks the entries a std::sort of the keys puts at ranks [start, stop) (0 < stop - start < n): out[j] = 1 or 0,
 * or, with trim, out (src's dtype) = src * that 0/1 mask as torch multiplies it (src itself, or a zero of src's
 * sign). src: n float32 (bf16 = 0) or bf16 (bf16 = 1) values; key, idx: scratch of n entries. Returns the number
 * of tied entries found (>= 0), -1 where a key is NaN (torch orders NaN first), -2 where a part on a boundary's
 * path would reach the depth limit (heapsort there), -3 with trim where a key is infinite (inf * 0 is NaN, not a
 * zero): the caller then does it the slow way. */
int64_t sg_rank_mask(const void *src, int bf16, int64_t n, int64_t start, int64_t stop, int magnitude,
                     int negate, float *key, ix_t *idx, void *out, int trim) {
    uint32_t *kb = (uint32_t *)key, nan = 0, inf = 0;
    for (int64_t j = 0; j < n; j++) {
        uint32_t b = key_bits(src, j, bf16, magnitude, negate);
        kb[j] = b;
        idx[j] = (ix_t)j;
        nan |= (b & 0x7FFFFFFFu) > 0x7F800000u;
        inf |= (b & 0x7FFFFFFFu) == 0x7F800000u;
    }
    if (nan) return -1;
    if (trim && inf) return -3;
    int depth = 0;
    for (int64_t m = n; m > 1; m >>= 1) depth++;
    /* parts holding a boundary strictly inside (at most two at a time), then the final parts of <= 16 */
    int64_t todo[8][3], done[4][2];
    int nt = 0, nd = 0;
    todo[nt][0] = 0, todo[nt][1] = n, todo[nt][2] = 2 * depth, nt++;
    while (nt > 0) {
        nt--;
        int64_t lo = todo[nt][0], hi = todo[nt][1], d = todo[nt][2];
        if (hi - lo <= THRESHOLD) {
            done[nd][0] = lo, done[nd][1] = hi, nd++;
            continue;
        }
        if (d == 0) return -2;
        int64_t cut = partition(key, idx, lo, hi);
        int64_t parts[2][2] = {{lo, cut}, {cut, hi}};
        for (int s = 0; s < 2; s++) {
            int64_t a = parts[s][0], b = parts[s][1];
            if ((a < start && start < b) || (a < stop && stop < b)) {
                todo[nt][0] = a, todo[nt][1] = b, todo[nt][2] = d - 1, nt++;
            }
        }
    }
    int inside_start = 0, inside_stop = 0;
    for (int s = 0; s < nd; s++) { /* the final insertion sort (stable for equal keys) of each boundary part */
        int64_t lo = done[s][0], hi = done[s][1];
        for (int64_t i = lo + 1; i < hi; i++) {
            float v = key[i];
            ix_t x = idx[i];
            int64_t j = i;
            while (j > lo && v < key[j - 1]) {
                key[j] = key[j - 1];
                idx[j] = idx[j - 1];
                j--;
            }
            key[j] = v;
            idx[j] = x;
        }
        inside_start |= lo < start && start < hi;
        inside_stop |= lo < stop && stop < hi;
    }
    /* The lowest and highest key at ranks [start, stop): where a boundary ended inside a (now sorted) final part,
     * everything before it is <= and everything after >=, so they sit at start and stop - 1; else scan. */
    float lo_v = key[start], hi_v = key[stop - 1];
    if (!inside_start || !inside_stop) {
        for (int64_t j = start; j < stop; j++) {
            lo_v = key[j] < lo_v ? key[j] : lo_v;
            hi_v = key[j] > hi_v ? key[j] : hi_v;
        }
    }
    /* positions [start, stop) hold exactly those ranks, not in order: the ones tied with a boundary key that is
     * cut (start > 0, stop < n) are compacted to idx[:count] (writes at or before reads) */
    const int has_lo = start > 0, has_hi = stop < n;
    int64_t count = 0;
    for (int64_t j = start; j < stop; j++) {
        float v = key[j];
        if ((has_lo && v == lo_v) || (has_hi && v == hi_v)) idx[count++] = idx[j];
    }
    /* strictly between the boundary keys: inside whatever the order; then the ties the replay put inside */
#define INSIDE(j) ((!has_lo || as_float(key_bits(src, j, bf16, magnitude, negate)) > lo_v) && \
                   (!has_hi || as_float(key_bits(src, j, bf16, magnitude, negate)) < hi_v))
    if (!trim) {
        uint8_t *mask = (uint8_t *)out;
        for (int64_t j = 0; j < n; j++) mask[j] = INSIDE(j);
        for (int64_t t = 0; t < count; t++) mask[idx[t]] = 1;
    } else if (bf16) { /* finite x * 1 = x, x * 0 = a zero with x's sign (the product rounds exactly) */
        const uint16_t *x = (const uint16_t *)src;
        uint16_t *y = (uint16_t *)out;
        for (int64_t j = 0; j < n; j++) y[j] = INSIDE(j) ? x[j] : (uint16_t)(x[j] & 0x8000u);
        for (int64_t t = 0; t < count; t++) y[idx[t]] = x[idx[t]];
    } else {
        const uint32_t *x = (const uint32_t *)src;
        uint32_t *y = (uint32_t *)out;
        for (int64_t j = 0; j < n; j++) y[j] = INSIDE(j) ? x[j] : (x[j] & 0x80000000u);
        for (int64_t t = 0; t < count; t++) y[idx[t]] = x[idx[t]];
    }
#undef INSIDE
    return count;
}

static struct PyModuleDef sortreplay_module = {
    PyModuleDef_HEAD_INIT, "_sortreplay",
    "The std::sort replay of skillgraft.merge.sortpath (C functions called through ctypes).", -1, NULL,
};

PyMODINIT_FUNC PyInit__sortreplay(void) { return PyModule_Create(&sortreplay_module); }
