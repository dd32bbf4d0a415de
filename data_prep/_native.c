/* data_prep._native: the KG join's hot loops, compiled.

   kg_index.AliasMatcher finds word-bounded, leftmost-longest, non-overlapping alias matches with NumPy, about
   twenty passes over every character of the text (prefix hashes, start buckets, a lookup per alias length,
   the text check, the choice among overlapping matches). match() does the same in one pass that hashes only
   where a key can start and stops at the longest key length, and gives the same matches (tests/test_kg_index.py
   holds the NumPy matcher and pyahocorasick as its references). It reads the index's arrays as they are
   memory-mapped (buffers, no copy) and Python's own Unicode tables (str.isalnum, str.isspace), so it needs no
   library beyond the Python headers. The caller (kg_index, arrays, join) passes arrays of the dtypes named.

   classes(text) -> bytes           a byte per character: 1 str.isalnum(), 2 str.isspace()
   match(text, hay, classes, lead, starts, widths, length_key, bounds, hash, hash_sample, stride, filter, shift,
         key_off, key_blob) -> bytes of int64 (start, end, key), by start   (kg_index.AliasMatcher._match_native)
   equal_range(keys, sample, stride, needles) -> (first, count)              (arrays.SortedKeys)
   sentences(code_points, classes, offsets) -> (starts, ends)                (join.sentence_spans)
   attach(start, end, entity, offsets, sentence_starts, sentence_ends, pair_keys, pair_sample, stride, pair_triple,
          n_entities, n_triples, token_begin, token_end, token_offsets)
       -> (n_mentions, spans, entity_ids, triples)           (join._join_arrays; _attach_numpy)
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

#define ALNUM 1
#define SPACE 2
#define HASH_BASE 0x9E3779B97F4A7C15ULL /* kg_index._B */

static inline Py_UCS4 read_char(int kind, const void *data, Py_ssize_t i) {
    switch (kind) {
    case PyUnicode_1BYTE_KIND: return ((const Py_UCS1 *)data)[i];
    case PyUnicode_2BYTE_KIND: return ((const Py_UCS2 *)data)[i];
    default: return ((const Py_UCS4 *)data)[i];
    }
}

static inline uint8_t char_class(Py_UCS4 c) {
    if (c < 128) { /* str.isspace of ASCII: \t \n \v \f \r, \x1c to \x1f and the space */
        uint8_t alnum = (c >= '0' && c <= '9') || ((c | 32) >= 'a' && (c | 32) <= 'z');
        uint8_t space = c == ' ' || (c >= 9 && c <= 13) || (c >= 28 && c <= 31);
        return alnum * ALNUM + space * SPACE;
    }
    return (Py_UNICODE_ISALNUM(c) ? ALNUM : 0) | (Py_UNICODE_ISSPACE(c) ? SPACE : 0);
}

static uint8_t latin1_class[256]; /* char_class of the first 256 code points, filled at import */

static PyObject *classes(PyObject *self, PyObject *args) {
    PyObject *text;
    if (!PyArg_ParseTuple(args, "U:classes", &text)) return NULL;
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (out == NULL) return NULL;
    uint8_t *cls = (uint8_t *)PyBytes_AS_STRING(out);
    if (kind == PyUnicode_1BYTE_KIND) {
        const Py_UCS1 *d = data;
        for (Py_ssize_t i = 0; i < n; i++) cls[i] = latin1_class[d[i]];
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_UCS4 c = read_char(kind, data, i);
            cls[i] = c < 256 ? latin1_class[c] : char_class(c);
        }
    }
    return out;
}

/* The first byte of code point c in UTF-8. */
static inline unsigned lead_byte(uint64_t c) {
    return c < 0x80 ? (unsigned)c : c < 0x800 ? 0xC0 | (unsigned)(c >> 6) : c < 0x10000 ? 0xE0 | (unsigned)(c >> 12)
                                                                              : 0xF0 | (unsigned)(c >> 18);
}

/* kg_index._bucket of up to three code points and their count */
static inline uint64_t bucket(uint64_t c0, uint64_t c1, uint64_t c2, uint64_t width, uint64_t buckets) {
    uint64_t h = ((c0 * 0x9E3779B1ULL + c1) * 0x85EBCA77ULL + c2) * 0xC2B2AE3DULL + width;
    return (h ^ (h >> 29)) & (buckets - 1);
}

/* Whether the UTF-8 bytes [p, end) are the code points hay[s, s + length). */
static int same_text(const uint8_t *p, const uint8_t *end, int kind, const void *hay, Py_ssize_t s,
                     Py_ssize_t length) {
    Py_ssize_t i = 0;
    while (p < end) {
        Py_UCS4 c;
        uint8_t b = *p;
        int more;
        if (b < 0x80) { c = b; more = 0; }
        else if (b < 0xE0) { c = b & 0x1F; more = 1; }
        else if (b < 0xF0) { c = b & 0x0F; more = 2; }
        else { c = b & 0x07; more = 3; }
        if (end - p <= more) return 0; /* a character cut short */
        p++;
        for (int m = 0; m < more; m++) c = (c << 6) | (*p++ & 0x3F);
        if (i >= length || read_char(kind, hay, s + i) != c) return 0;
        i++;
    }
    return i == length;
}

/* A candidate: the piece [start, start + length) of the haystack, a word-bounded piece of a key length k
   whose hash h passed the filter; pos, the first key of that length whose hash is not below h. */
typedef struct {
    int64_t start, length, k, pos;
    uint64_t h;
} Candidate;

typedef struct {
    Candidate *v;
    Py_ssize_t n, cap;
} Candidates;

static int push(Candidates *c, Candidate x) {
    if (c->n == c->cap) {
        Py_ssize_t cap = c->cap ? 2 * c->cap : 1024;
        Candidate *v = realloc(c->v, cap * sizeof(Candidate));
        if (v == NULL) return -1;
        c->v = v, c->cap = cap;
    }
    c->v[c->n++] = x;
    return 0;
}

#define LANES 16

/* A sorted array of uint64 in memory-mapped pages (millions of keys: most of a binary search's steps miss the
   cache and the TLB), with a copy of every stride-th key that fits in the cache (sample[i] = keys[i * stride]).
   A search finds the stride-wide window in the sample, then the key in the window: a few misses, on one or two
   pages. */
typedef struct {
    const uint64_t *keys, *sample;
    int64_t n, n_sample, stride;
} Sorted;

/* The lanes' lower bounds in a[base, base + size), LANES at a time: where the first entry not below h lies. The
   steps of one search depend on one another; the lanes' do not, so their loads are waited for together. On
   return each lane's answer is base + (size == 1 && a[base] < h). */
static void lockstep(const uint64_t *a, int64_t *base, int64_t *size, const uint64_t *h, int lanes) {
    for (int active = 1; active;) { /* the answer lies in [base, base + size] */
        active = 0;
        for (int i = 0; i < lanes; i++) {
            if (size[i] > 1) {
                int64_t half = size[i] / 2;
                base[i] = a[base[i] + half] < h[i] ? base[i] + half : base[i];
                size[i] -= half;
                active = 1;
            }
        }
    }
}

/* lower_bound(keys[lo, hi), h) of the lanes' (lo, hi, h): the first position whose key is not below h, or hi. */
static void lower_bounds(const Sorted *t, const int64_t *lo, const int64_t *hi, const uint64_t *h, int64_t *out,
                         int lanes) {
    int64_t base[LANES], size[LANES];
    /* 1. in the sample: its first entry at or above h, among those of positions in [lo, hi) */
    for (int i = 0; i < lanes; i++) {
        int64_t a = (lo[i] + t->stride - 1) / t->stride, b = (hi[i] + t->stride - 1) / t->stride;
        base[i] = a, size[i] = b - a;
    }
    lockstep(t->sample, base, size, h, lanes);
    /* 2. in the window between that sample entry and the one before it */
    for (int i = 0; i < lanes; i++) {
        int64_t a = (lo[i] + t->stride - 1) / t->stride;
        int64_t s = base[i] + (size[i] == 1 && t->sample[base[i]] < h[i]); /* first sample at or above h */
        int64_t w_lo = s > a ? (s - 1) * t->stride + 1 : lo[i];
        int64_t w_hi = s * t->stride < hi[i] ? s * t->stride : hi[i]; /* the answer is at most this */
        if (w_lo < lo[i]) w_lo = lo[i];
        base[i] = w_lo, size[i] = w_hi - w_lo;
    }
    lockstep(t->keys, base, size, h, lanes);
    for (int i = 0; i < lanes; i++) out[i] = base[i] + (size[i] == 1 && t->keys[base[i]] < h[i]);
}

/* Reads a Sorted from buffers: keys, their sample, the stride. */
static int sorted_of(Sorted *t, const Py_buffer *keys, const Py_buffer *sample, int64_t stride) {
    t->keys = keys->buf, t->sample = sample->buf, t->stride = stride;
    t->n = keys->len / (Py_ssize_t)sizeof(uint64_t), t->n_sample = sample->len / (Py_ssize_t)sizeof(uint64_t);
    if (stride < 1 || t->n_sample != (t->n + stride - 1) / stride) {
        PyErr_SetString(PyExc_ValueError, "the sample is not every stride-th key");
        return -1;
    }
    return 0;
}

static PyObject *match(PyObject *self, PyObject *args) {
    PyObject *text, *hay;
    Py_buffer cls_b, lead_b, starts_b, length_key_b, bounds_b, hash_b, sample_b, filter_b, key_off_b, key_blob_b;
    int widths, shift;
    long long stride;
    if (!PyArg_ParseTuple(args, "UUy*y*y*iy*y*y*y*Ly*iy*y*:match", &text, &hay, &cls_b, &lead_b, &starts_b, &widths,
                          &length_key_b, &bounds_b, &hash_b, &sample_b, &stride, &filter_b, &shift, &key_off_b,
                          &key_blob_b))
        return NULL;
    Sorted sorted_hash;
    PyObject *out = NULL;
    Candidates cand = {NULL, 0, 0};
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    Py_ssize_t max_len = length_key_b.len / (Py_ssize_t)sizeof(int64_t) - 1;
    uint64_t buckets = 8 * (uint64_t)starts_b.len; /* a bit each */
    if (PyUnicode_GET_LENGTH(hay) != n || cls_b.len != n || lead_b.len != 32 || max_len < 0 || (buckets & (buckets - 1)) ||
        !buckets || shift < 0 || shift > 63) {
        PyErr_SetString(PyExc_ValueError, "match: the text, haystack and classes differ in length, or a "
                                          "table is malformed");
        goto done;
    }
    if (sorted_of(&sorted_hash, &hash_b, &sample_b, stride) < 0) goto done;
    {
        int kind = PyUnicode_KIND(hay);
        const void *h_data = PyUnicode_DATA(hay);
        const uint8_t *cls = cls_b.buf, *lead = lead_b.buf, *starts = starts_b.buf, *filter = filter_b.buf;
        const uint8_t *key_blob = key_blob_b.buf;
        const int64_t *length_key = length_key_b.buf, *bounds = bounds_b.buf, *key_off = key_off_b.buf;
        const uint64_t *hash = hash_b.buf;
        Py_ssize_t filter_bytes = filter_b.len;
#define BOUNDARY(i) ((i) <= 0 || (i) >= n || !((cls[(i) - 1] & cls[(i)]) & ALNUM))
        /* 1. every word-bounded piece that may be a key: it starts on a word boundary, not on a space (keys
           are stripped), where the bucket of its first characters holds some key's (a bit of starts), and
           its hash passes the filter (kg_index.AliasMatcher._may_be_key), read in a pass of its own with no
           branch on what it holds, so that its cache misses overlap */
#define BIT(table, i) (((table)[(uint64_t)(i) >> 3] >> ((uint64_t)(i) & 7)) & 1)
        for (Py_ssize_t s = 0; s < n; s++) {
            if (!BOUNDARY(s) || (cls[s] & SPACE)) continue;
            uint64_t c0 = read_char(kind, h_data, s);
            if (!BIT(lead, lead_byte(c0))) continue; /* no key's UTF-8 begins with this byte */
            /* a key of one or two characters can start here only where it would end on a word boundary */
            uint64_t c1 = s + 1 < n ? read_char(kind, h_data, s + 1) : 0;
            uint64_t c2 = s + 2 < n ? read_char(kind, h_data, s + 2) : 0;
            int can = ((widths & 4) && s + 3 <= n && BIT(starts, bucket(c0, c1, c2, 3, buckets))) ||
                      ((widths & 1) && BOUNDARY(s + 1) && BIT(starts, bucket(c0, 0, 0, 1, buckets))) ||
                      ((widths & 2) && s + 2 <= n && BOUNDARY(s + 2) && BIT(starts, bucket(c0, c1, 0, 2, buckets)));
            if (!can) continue;
            uint64_t h = 0;
            for (Py_ssize_t length = 1; length <= max_len && s + length <= n; length++) {
                Py_UCS4 c = read_char(kind, h_data, s + length - 1);
                if (c == 0) break; /* the separator of the texts joined, which no key holds */
                h = h * HASH_BASE + (uint64_t)c + 1;
                int64_t k = length_key[length];
                if (k < 0 || !BOUNDARY(s + length)) continue;
                Candidate x = {s, length, k, 0, h};
                if (push(&cand, x) < 0) goto no_memory;
                if ((Py_ssize_t)((h >> shift) >> 3) < filter_bytes) __builtin_prefetch(filter + ((h >> shift) >> 3));
            }
        }
        Py_ssize_t m = 0;
        for (Py_ssize_t i = 0; i < cand.n; i++) {
            Candidate x = cand.v[i];
            uint64_t top = x.h >> shift;
            cand.v[m] = x;
            m += (Py_ssize_t)(top >> 3) < filter_bytes && BIT(filter, top);
        }
        cand.n = m;
#undef BIT
        /* 2. each candidate's key (pos; -1 for none): where its hash lies among the keys of its length,
           searched LANES at a time, then the key of that hash whose text is the piece. A block's key offsets
           and texts are fetched while the next blocks are searched, and it is checked three blocks later, while
           the hashes its search read are still in the cache. */
        Py_ssize_t blocks = (cand.n + LANES - 1) / LANES;
        for (Py_ssize_t b = 0; b < blocks + 3; b++) {
            if (b < blocks) {
                Candidate *c = cand.v + b * LANES;
                int lanes = cand.n - b * LANES < LANES ? (int)(cand.n - b * LANES) : LANES;
                int64_t lo[LANES], hi[LANES], at[LANES];
                uint64_t h[LANES];
                for (int i = 0; i < lanes; i++) lo[i] = bounds[c[i].k], hi[i] = bounds[c[i].k + 1], h[i] = c[i].h;
                lower_bounds(&sorted_hash, lo, hi, h, at, lanes);
                for (int i = 0; i < lanes; i++) {
                    c[i].pos = at[i];
                    __builtin_prefetch(key_off + at[i]);
                }
            }
            if (b >= 2 && b - 2 < blocks) {
                Candidate *c = cand.v + (b - 2) * LANES;
                int lanes = cand.n - (b - 2) * LANES < LANES ? (int)(cand.n - (b - 2) * LANES) : LANES;
                for (int i = 0; i < lanes; i++) __builtin_prefetch(key_blob + key_off[c[i].pos]);
            }
            if (b >= 3) {
                Candidate *c = cand.v + (b - 3) * LANES;
                int lanes = cand.n - (b - 3) * LANES < LANES ? (int)(cand.n - (b - 3) * LANES) : LANES;
                for (int i = 0; i < lanes; i++) {
                    Candidate *x = &c[i];
                    int64_t found = -1;
                    for (int64_t j = x->pos; j < bounds[x->k + 1] && hash[j] == x->h; j++) { /* equal hashes */
                        if (same_text(key_blob + key_off[j], key_blob + key_off[j + 1], kind, h_data, x->start,
                                      x->length)) {
                            found = j;
                            break;
                        }
                    }
                    x->pos = found;
                }
            }
        }
        /* 3. at each start the longest match, taken where no earlier one reaches (candidates are by start,
           then length); the matches are kept in place, the first `kept` candidates */
        Py_ssize_t kept = 0, taken_until = 0;
        for (Py_ssize_t i = 0; i < cand.n;) {
            int64_t s = cand.v[i].start, best = -1;
            for (; i < cand.n && cand.v[i].start == s; i++)
                if (cand.v[i].pos >= 0) best = i;
            if (best >= 0 && s >= taken_until) {
                cand.v[kept++] = cand.v[best];
                taken_until = s + cand.v[best].length;
            }
        }
        out = PyBytes_FromStringAndSize(NULL, kept * 3 * (Py_ssize_t)sizeof(int64_t));
        if (out != NULL) {
            int64_t *v = (int64_t *)PyBytes_AS_STRING(out);
            for (Py_ssize_t i = 0; i < kept; i++) {
                v[3 * i] = cand.v[i].start;
                v[3 * i + 1] = cand.v[i].start + cand.v[i].length;
                v[3 * i + 2] = cand.v[i].pos;
            }
        }
#undef BOUNDARY
    }
    goto done;
no_memory:
    PyErr_NoMemory();
done:
    free(cand.v);
    PyBuffer_Release(&cls_b), PyBuffer_Release(&lead_b), PyBuffer_Release(&starts_b), PyBuffer_Release(&length_key_b);
    PyBuffer_Release(&bounds_b), PyBuffer_Release(&hash_b), PyBuffer_Release(&sample_b), PyBuffer_Release(&filter_b);
    PyBuffer_Release(&key_off_b), PyBuffer_Release(&key_blob_b);
    return out;
}

/* equal_range(keys, sample, stride, needles) -> (first, count): for each needle, the first position of its value
   in the sorted keys (where it would go if absent) and how many times it is there (see Sorted). uint64 keys, or
   int64 ones none of which is negative (the KG's pair keys), which sort alike. */
static PyObject *equal_range(PyObject *self, PyObject *args) {
    Py_buffer keys_b, sample_b, needles_b;
    long long stride;
    if (!PyArg_ParseTuple(args, "y*y*Ly*:equal_range", &keys_b, &sample_b, &stride, &needles_b)) return NULL;
    PyObject *first = NULL, *count = NULL, *out = NULL;
    Sorted t;
    Py_ssize_t m = needles_b.len / (Py_ssize_t)sizeof(uint64_t);
    if (sorted_of(&t, &keys_b, &sample_b, stride) == 0) {
        first = PyBytes_FromStringAndSize(NULL, m * (Py_ssize_t)sizeof(int64_t));
        count = PyBytes_FromStringAndSize(NULL, m * (Py_ssize_t)sizeof(int64_t));
    }
    if (first != NULL && count != NULL) {
        const uint64_t *needles = needles_b.buf;
        int64_t *f = (int64_t *)PyBytes_AS_STRING(first), *c = (int64_t *)PyBytes_AS_STRING(count);
        int64_t lo[LANES], hi[LANES];
        for (int i = 0; i < LANES; i++) lo[i] = 0, hi[i] = t.n;
        for (Py_ssize_t b = 0; b < m; b += LANES) {
            int lanes = m - b < LANES ? (int)(m - b) : LANES;
            lower_bounds(&t, lo, hi, needles + b, f + b, lanes);
            for (int i = 0; i < lanes; i++) {
                int64_t k = f[b + i];
                while (k < t.n && t.keys[k] == needles[b + i]) k++;
                c[b + i] = k - f[b + i];
            }
        }
        out = PyTuple_Pack(2, first, count);
    }
    Py_XDECREF(first), Py_XDECREF(count);
    PyBuffer_Release(&keys_b), PyBuffer_Release(&sample_b), PyBuffer_Release(&needles_b);
    return out;
}

/* sentences(code_points, classes, offsets) -> (starts, ends): join.sentence_spans in one pass, of the texts
   joined (their uint32 code points and kg_index.text_classes; offsets, int64: where each text starts, and one
   past the last one's end + 1). A sentence ends before a run of whitespace that follows ".", "!" or "?", and
   the next starts after that run; empty ones are left out. */
static PyObject *sentences(PyObject *self, PyObject *args) {
    Py_buffer cp_b, cls_b, off_b;
    if (!PyArg_ParseTuple(args, "y*y*y*:sentences", &cp_b, &cls_b, &off_b)) return NULL;
    PyObject *starts = NULL, *ends = NULL, *out = NULL;
    Py_ssize_t n = cls_b.len, texts = off_b.len / (Py_ssize_t)sizeof(int64_t) - 1;
    const int64_t *off = off_b.buf;
    const uint8_t *cls = cls_b.buf;
    const uint32_t *cp = cp_b.buf;
    int64_t *v = NULL;
    Py_ssize_t count = 0, cap = 0;
    if (cp_b.len != n * (Py_ssize_t)sizeof(uint32_t) || texts < 0) {
        PyErr_SetString(PyExc_ValueError, "sentences: the code points and classes differ in length");
        goto done;
    }
    for (Py_ssize_t d = 0; d < texts; d++) {
        int64_t first = off[d], end = off[d + 1] - 1 < n ? off[d + 1] - 1 : n, start = first;
        for (int64_t i = first; i <= end;) {
            int64_t cut = i, next = i;
            if (i < end) { /* a cut: whitespace after ".", "!" or "?"; the next sentence starts after it */
                if (!(cls[i] & SPACE) || i == first) {
                    i++;
                    continue;
                }
                uint32_t c = cp[i - 1];
                if (c != '.' && c != '!' && c != '?') {
                    i++;
                    continue;
                }
                while (next < end && (cls[next] & SPACE)) next++;
            }
            if (cut > start) {
                if (count + 2 > cap) {
                    cap = cap ? 2 * cap : 4096;
                    int64_t *w = realloc(v, cap * sizeof(int64_t));
                    if (w == NULL) {
                        PyErr_NoMemory();
                        goto done;
                    }
                    v = w;
                }
                v[count++] = start, v[count++] = cut;
            }
            if (i == end) break;
            start = i = next;
        }
    }
    starts = PyBytes_FromStringAndSize(NULL, count / 2 * (Py_ssize_t)sizeof(int64_t));
    ends = PyBytes_FromStringAndSize(NULL, count / 2 * (Py_ssize_t)sizeof(int64_t));
    if (starts != NULL && ends != NULL) {
        int64_t *a = (int64_t *)PyBytes_AS_STRING(starts), *b = (int64_t *)PyBytes_AS_STRING(ends);
        for (Py_ssize_t k = 0; k < count / 2; k++) a[k] = v[2 * k], b[k] = v[2 * k + 1];
        out = PyTuple_Pack(2, starts, ends);
    }
done:
    free(v);
    Py_XDECREF(starts), Py_XDECREF(ends);
    PyBuffer_Release(&cp_b), PyBuffer_Release(&cls_b), PyBuffer_Release(&off_b);
    return out;
}

/* np.searchsorted(a, x, "right") of the ascending a[0, n): the first position whose value is above x; walked
   from p, the answer to a query near x. The queries of attach come in ascending order, so each walk is a few
   steps, which (unlike a binary search's) the processor predicts. */
static inline int64_t seek_upper(const int64_t *a, int64_t n, int64_t x, int64_t p) {
    while (p > 0 && a[p - 1] > x) p--;
    while (p < n && a[p] <= x) p++;
    return p;
}

/* np.searchsorted(a, x, "left"): the first position whose value is not below x; walked from p as seek_upper. */
static inline int64_t seek_lower(const int64_t *a, int64_t n, int64_t x, int64_t p) {
    while (p > 0 && a[p - 1] >= x) p--;
    while (p < n && a[p] < x) p++;
    return p;
}

typedef struct {
    int64_t *v;
    Py_ssize_t n, cap;
} Vec;

static inline int vec_push(Vec *x, int64_t a) {
    if (x->n == x->cap) {
        Py_ssize_t cap = x->cap ? 2 * x->cap : 1024;
        int64_t *v = realloc(x->v, cap * sizeof(int64_t));
        if (v == NULL) return -1;
        x->v = v, x->cap = cap;
    }
    x->v[x->n++] = a;
    return 0;
}

static int cmp_int64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Sorts v[0, n) ascending and keeps each value once; returns how many are left. */
static Py_ssize_t sort_unique(int64_t *v, Py_ssize_t n) {
    if (n < 24) { /* a sentence's few entities or triples */
        for (Py_ssize_t i = 1; i < n; i++) {
            int64_t x = v[i];
            Py_ssize_t j = i;
            for (; j > 0 && v[j - 1] > x; j--) v[j] = v[j - 1];
            v[j] = x;
        }
    } else {
        qsort(v, n, sizeof(int64_t), cmp_int64);
    }
    Py_ssize_t u = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (u == 0 || v[i] != v[u - 1]) v[u++] = v[i];
    return u;
}

/* Of (key, value) pairs laid end to end in v[0, n), those of one key together: the run of the key at v[c]. Its
   values are packed at v[c + 1 ...] (over pairs already read), ascending and each once; returns how many, and
   in *next where the next run starts. */
static Py_ssize_t run_values(int64_t *v, Py_ssize_t n, Py_ssize_t c, Py_ssize_t *next) {
    Py_ssize_t u = 0, j = c;
    for (; j < n && v[j] == v[c]; j += 2) v[c + 1 + u++] = v[j + 1];
    *next = j;
    return sort_unique(v + c + 1, u);
}

static PyObject *bytes_of(const int64_t *v, Py_ssize_t n) {
    return PyBytes_FromStringAndSize((const char *)v, n * (Py_ssize_t)sizeof(int64_t));
}

enum { A_START, A_END, A_ENTITY, A_OFFSETS, A_SENT_S, A_SENT_E, A_KEYS, A_SAMPLE, A_TRIPLE, A_BEGIN, A_FIN, A_TOK_OFF,
       A_N };

/* attach(start, end, entity, offsets, sentence_starts, sentence_ends, pair_keys, pair_sample, stride, pair_triple,
          n_entities, n_triples, token_begin, token_end, token_offsets) -> (n_mentions, spans, entity_ids, triples):
   join._attach_numpy in one pass, all int64 (see there): of the alias matches (start, end, entity) by start in the
   texts joined, each text's mentions; the mentions that cover a token as (text, first token, end token, entity
   rank), the entities ranked by first mention; and the KG triples of each ordered pair of distinct entities of a
   sentence (the pair keys head * n_entities + tail sorted, as a Sorted with their sample; pair_triple, the triple
   of each), by sentence then triple, as (text, first token, end token, triple) of the sentence. */
static PyObject *attach(PyObject *self, PyObject *args) {
    Py_buffer b[A_N];
    long long stride, n_entities, n_triples;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*y*Ly*LLy*y*y*:attach", &b[A_START], &b[A_END], &b[A_ENTITY],
                          &b[A_OFFSETS], &b[A_SENT_S], &b[A_SENT_E], &b[A_KEYS], &b[A_SAMPLE], &stride, &b[A_TRIPLE],
                          &n_entities, &n_triples, &b[A_BEGIN], &b[A_FIN], &b[A_TOK_OFF]))
        return NULL;
    Py_ssize_t len[A_N];
    for (int i = 0; i < A_N; i++) len[i] = b[i].len / (Py_ssize_t)sizeof(int64_t);
    const int64_t *start = b[A_START].buf, *end = b[A_END].buf, *entity = b[A_ENTITY].buf, *off = b[A_OFFSETS].buf;
    const int64_t *sent_s = b[A_SENT_S].buf, *sent_e = b[A_SENT_E].buf, *triple_of = b[A_TRIPLE].buf;
    const int64_t *begin = b[A_BEGIN].buf, *fin = b[A_FIN].buf, *tok_off = b[A_TOK_OFF].buf;
    Py_ssize_t m = len[A_START], n_docs = len[A_OFFSETS] - 1, n_sent = len[A_SENT_S], n_tok = len[A_BEGIN];
    PyObject *out = NULL;
    Vec spans = {0}, ranked = {0}, cells = {0}, keys = {0}, key_sentence = {0}, found = {0}, triples = {0};
    int64_t *table = NULL, *n_mentions = NULL;
    Sorted t;
    if (len[A_END] != m || len[A_ENTITY] != m || n_docs < 0 || len[A_SENT_E] != n_sent || len[A_FIN] != n_tok ||
        len[A_TOK_OFF] != n_docs + 1 || len[A_TRIPLE] != len[A_KEYS] || n_entities < 1 || n_triples < 1) {
        PyErr_SetString(PyExc_ValueError, "attach: arrays of inconsistent lengths");
        goto done;
    }
    if (sorted_of(&t, &b[A_KEYS], &b[A_SAMPLE], stride) < 0) goto done;
    /* the entities' ranks: an open-addressing table of (entity, rank), at most half full */
    Py_ssize_t slots = 64;
    while (slots < 2 * m + 2) slots *= 2;
    table = malloc(2 * slots * sizeof(int64_t));
    n_mentions = calloc(n_docs > 0 ? n_docs : 1, sizeof(int64_t));
    if (table == NULL || n_mentions == NULL) goto nomem;
    for (Py_ssize_t i = 0; i < slots; i++) table[2 * i] = -1;

    /* each mention: its text, sentence and tokens */
    int64_t d = 0, sk = 0, ts = 0, te = 0; /* one past the mention's text and sentence; its tokens */
    for (Py_ssize_t i = 0; i < m; i++) {
        d = seek_upper(off, n_docs + 1, start[i], d);
        sk = seek_upper(sent_s, n_sent, start[i], sk);
        if (d < 1 || d > n_docs || entity[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "attach: a match outside the texts");
            goto done;
        }
        n_mentions[d - 1]++;
        if (sk > 0 && end[i] <= sent_e[sk - 1]) /* a mention across a sentence end belongs to none */
            if (vec_push(&cells, sk - 1) < 0 || vec_push(&cells, entity[i]) < 0) goto nomem;
        ts = seek_upper(fin, n_tok, start[i], ts), te = seek_lower(begin, n_tok, end[i], te);
        if (te <= ts) continue; /* it covers no token */
        uint64_t h = (uint64_t)entity[i] * HASH_BASE;
        Py_ssize_t s = (Py_ssize_t)(h >> 32) & (slots - 1);
        while (table[2 * s] != -1 && table[2 * s] != entity[i]) s = (s + 1) & (slots - 1);
        if (table[2 * s] == -1) {
            table[2 * s] = entity[i], table[2 * s + 1] = ranked.n;
            if (vec_push(&ranked, entity[i]) < 0) goto nomem;
        }
        if (vec_push(&spans, d - 1) < 0 || vec_push(&spans, ts - tok_off[d - 1]) < 0 ||
            vec_push(&spans, te - tok_off[d - 1]) < 0 || vec_push(&spans, table[2 * s + 1]) < 0)
            goto nomem;
    }

    /* distant supervision: each sentence's distinct entities (the cells come by sentence), their ordered pairs */
    for (Py_ssize_t c = 0, next; c < cells.n; c = next) {
        int64_t k = cells.v[c], *e = cells.v + c + 1;
        Py_ssize_t u = run_values(cells.v, cells.n, c, &next);
        for (Py_ssize_t x = 0; x < u; x++)
            for (Py_ssize_t y = 0; y < u; y++)
                if (x != y && (vec_push(&keys, e[x] * n_entities + e[y]) < 0 || vec_push(&key_sentence, k) < 0))
                    goto nomem;
    }
    /* their KG triples, the lookups LANES at a time */
    {
        int64_t lo[LANES], hi[LANES], first[LANES];
        for (int i = 0; i < LANES; i++) lo[i] = 0, hi[i] = t.n;
        for (Py_ssize_t q = 0; q < keys.n; q += LANES) {
            int lanes = keys.n - q < LANES ? (int)(keys.n - q) : LANES;
            lower_bounds(&t, lo, hi, (const uint64_t *)keys.v + q, first, lanes);
            for (int i = 0; i < lanes; i++)
                for (int64_t j = first[i]; j < t.n && t.keys[j] == (uint64_t)keys.v[q + i]; j++)
                    if (vec_push(&found, key_sentence.v[q + i]) < 0 || vec_push(&found, triple_of[j]) < 0) goto nomem;
        }
    }
    /* each sentence's triples once, ascending, with the sentence's text and tokens */
    d = ts = te = 0;
    for (Py_ssize_t c = 0, next; c < found.n; c = next) {
        int64_t k = found.v[c], *tr = found.v + c + 1;
        Py_ssize_t u = run_values(found.v, found.n, c, &next);
        d = seek_upper(off, n_docs + 1, sent_s[k], d);
        if (d < 1 || d > n_docs) {
            PyErr_SetString(PyExc_ValueError, "attach: a sentence outside the texts");
            goto done;
        }
        ts = seek_upper(fin, n_tok, sent_s[k], ts), te = seek_lower(begin, n_tok, sent_e[k], te);
        int64_t ete = te < ts + 1 ? ts + 1 : te;
        for (Py_ssize_t x = 0; x < u; x++) {
            if (tr[x] >= n_triples) {
                PyErr_SetString(PyExc_ValueError, "attach: a triple index beyond n_triples");
                goto done;
            }
            if (vec_push(&triples, d - 1) < 0 || vec_push(&triples, ts - tok_off[d - 1]) < 0 ||
                vec_push(&triples, ete - tok_off[d - 1]) < 0 || vec_push(&triples, tr[x]) < 0)
                goto nomem;
        }
    }
    out = Py_BuildValue("(NNNN)", bytes_of(n_mentions, n_docs), bytes_of(spans.v, spans.n), bytes_of(ranked.v, ranked.n),
                        bytes_of(triples.v, triples.n));
    goto done;
nomem:
    PyErr_NoMemory();
done:
    free(table), free(n_mentions);
    free(spans.v), free(ranked.v), free(cells.v), free(keys.v), free(key_sentence.v), free(found.v), free(triples.v);
    for (int i = 0; i < A_N; i++) PyBuffer_Release(&b[i]);
    return out;
}

static PyMethodDef methods[] = {
    {"classes", classes, METH_VARARGS, "A byte per character of the text: 1 str.isalnum(), 2 str.isspace()."},
    {"match", match, METH_VARARGS, "The alias matches of the texts joined: int64 (start, end, key) by start."},
    {"sentences", sentences, METH_VARARGS, "join.sentence_spans of the texts joined: (starts, ends), int64."},
    {"equal_range", equal_range, METH_VARARGS, "Each needle's first position in the sorted int64 haystack, and count."},
    {"attach", attach, METH_VARARGS, "join._attach_numpy of a batch: (n_mentions, spans, entity_ids, triples), int64."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "The alias matcher's compiled scan.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__native(void) {
    for (Py_UCS4 c = 0; c < 256; c++) latin1_class[c] = char_class(c);
    return PyModule_Create(&module);
}
