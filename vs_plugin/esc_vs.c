/*
 * esc-stream's VapourSynth shim: registers namespace `esc` with `Upscale` and hands all decisions and all
 * pixel work to Python (esc_stream.vapoursynth._native). VapourSynth's threads and frame cache do the
 * scheduling; this file only takes the GIL around the two Python calls (the factory at script time, `process`
 * per frame).
 *
 * Built by `python -m esc_stream.vapoursynth.build` into vapoursynth.get_plugin_dir(), where VapourSynth R74+
 * autoloads it.
 * Python symbols are left undefined on purpose: they resolve against the host's interpreter (python, vspipe's
 * libpython), so no second copy of Python is ever loaded. Only Python *functions* are used (no data symbols
 * such as Py_None), so the library still loads in a host without Python and fails politely in create.
 */
#define PY_SSIZE_T_CLEAN
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <Python.h>
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "VapourSynth4.h"

#define PREFIX "esc.Upscale: "
#define MSG_SIZE 1024

typedef struct {
    VSNode *node;     /* the RGBS/RGBH clip fed to the network */
    VSVideoInfo vi;   /* output: same format, scale times larger */
    PyObject *runner; /* esc_stream.vapoursynth._native.NodeRunner, owns the model */
} EscData;

typedef struct {
    char ns[32];
    char func[32];
    VSMap *args; /* every argument except `clip` */
} Step;

/* Message of the pending Python exception, first line only; clears it. Caller holds the GIL. */
static void py_error_message(char *buf, size_t size) {
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
#else
    PyObject *type, *tb, *exc;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
#endif
    const char *text = NULL;
    PyObject *str = exc ? PyObject_Str(exc) : NULL;
    if (str)
        text = PyUnicode_AsUTF8(str);
    if (!text)
        PyErr_Clear();
    if (!text || !text[0]) /* never empty: callers treat an empty message as success */
        text = exc ? Py_TYPE(exc)->tp_name : "unknown Python error";
    snprintf(buf, size, "%s", text);
    buf[strcspn(buf, "\r\n")] = '\0';
    if (!buf[0])
        snprintf(buf, size, "%s", exc ? Py_TYPE(exc)->tp_name : "unknown Python error");
    Py_XDECREF(str);
    Py_XDECREF(exc);
}

static int python_ready(void) {
    /* dlsym first: calling an unresolved lazily-bound symbol would kill a non-Python host. */
    return dlsym(RTLD_DEFAULT, "Py_IsInitialized") != NULL && Py_IsInitialized();
}

static int python_finalizing(void) {
#if PY_VERSION_HEX >= 0x030D0000
    return Py_IsFinalizing();
#else
    return _Py_IsFinalizing();
#endif
}

/* Drop a runner: stop its workers, release the model. Skipped while the interpreter shuts down, when taking
 * the GIL from a foreign thread would block forever; the process is exiting then anyway. */
static void release_runner(PyObject *runner) {
    if (!runner || !Py_IsInitialized() || python_finalizing())
        return;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *r = PyObject_CallMethod(runner, "close", NULL);
    if (!r)
        PyErr_Clear();
    Py_XDECREF(r);
    Py_DECREF(runner);
    PyGILState_Release(gil);
}

static void VS_CC esc_free(void *instance, VSCore *core, const VSAPI *vsapi) {
    EscData *d = (EscData *)instance;
    (void)core;
    vsapi->freeNode(d->node);
    release_runner(d->runner);
    free(d);
}

/* A plane as (memoryview, stride in bytes); the views are released after the call so Python cannot keep
 * pointers into frames VapourSynth may free. */
static PyObject *plane_views(const VSAPI *vsapi, const VSFrame *f, VSFrame *writable, int planes) {
    PyObject *tup = PyTuple_New(planes);
    for (int p = 0; tup && p < planes; p++) {
        ptrdiff_t stride = vsapi->getStride(f, p);
        Py_ssize_t size = (Py_ssize_t)stride * vsapi->getFrameHeight(f, p);
        char *ptr = writable ? (char *)vsapi->getWritePtr(writable, p) : (char *)vsapi->getReadPtr(f, p);
        PyObject *mv = PyMemoryView_FromMemory(ptr, size, writable ? PyBUF_WRITE : PyBUF_READ);
        PyObject *item = mv ? Py_BuildValue("(Nn)", mv, (Py_ssize_t)stride) : NULL;
        if (!item) {
            Py_DECREF(tup);
            return NULL;
        }
        PyTuple_SET_ITEM(tup, p, item);
    }
    return tup;
}

static void release_views(PyObject *views) {
    if (!views)
        return;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(views); i++) {
        PyObject *r = PyObject_CallMethod(PyTuple_GET_ITEM(PyTuple_GET_ITEM(views, i), 0), "release", NULL);
        if (!r)
            PyErr_Clear(); /* still exported by a leaked array: nothing more we can do */
        Py_XDECREF(r);
    }
    Py_DECREF(views);
}

static const VSFrame *VS_CC esc_get_frame(int n, int reason, void *instance, void **frame_data,
                                          VSFrameContext *ctx, VSCore *core, const VSAPI *vsapi) {
    EscData *d = (EscData *)instance;
    (void)frame_data;
    if (reason == arInitial) {
        vsapi->requestFrameFilter(n, d->node, ctx);
        return NULL;
    }
    if (reason != arAllFramesReady)
        return NULL;

    const VSFrame *src = vsapi->getFrameFilter(n, d->node, ctx);
    VSFrame *dst = vsapi->newVideoFrame(&d->vi.format, d->vi.width, d->vi.height, src, core);
    char msg[MSG_SIZE] = "";

    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *in = plane_views(vsapi, src, NULL, d->vi.format.numPlanes);
    PyObject *out = in ? plane_views(vsapi, dst, dst, d->vi.format.numPlanes) : NULL;
    PyObject *r = out ? PyObject_CallMethod(d->runner, "process", "iOO", n, in, out) : NULL;
    if (!r)
        py_error_message(msg, sizeof msg);
    Py_XDECREF(r);
    release_views(in);
    release_views(out);
    PyGILState_Release(gil);

    vsapi->freeFrame(src);
    if (msg[0]) {
        char full[MSG_SIZE + 64];
        snprintf(full, sizeof full, PREFIX "frame %d: %s", n, msg);
        vsapi->setFilterError(full, ctx);
        vsapi->freeFrame(dst);
        return NULL;
    }
    return dst;
}

/* {"key": int} for the colour properties of frame 0 the Python side decides the conversion from. */
static PyObject *frame_props(const VSAPI *vsapi, const VSFrame *f) {
    static const char *keys[] = {"_Matrix",          "_Range",  "_ColorRange", "_Transfer",
                                 "_Primaries",       "_SARNum", "_SARDen",     "_ChromaLocation"};
    PyObject *dict = PyDict_New();
    const VSMap *props = f ? vsapi->getFramePropertiesRO(f) : NULL;
    for (size_t i = 0; dict && props && i < sizeof keys / sizeof keys[0]; i++) {
        int err = 0;
        int64_t v = vsapi->mapGetInt(props, keys[i], 0, &err);
        if (!err) {
            PyObject *o = PyLong_FromLongLong(v);
            if (!o || PyDict_SetItemString(dict, keys[i], o) < 0) {
                Py_XDECREF(o);
                Py_CLEAR(dict);
            }
            Py_XDECREF(o);
        }
    }
    return dict;
}

static PyObject *arguments(const VSMap *in, const VSAPI *vsapi) {
    static const char *ints[] = {"scale", "tile", "overlap", "num_streams", "batch", "width", "height"};
    static const char *strs[] = {"weights", "model", "device"};
    PyObject *dict = PyDict_New();
    for (size_t i = 0; dict && i < sizeof ints / sizeof ints[0]; i++) {
        int err = 0;
        int64_t v = vsapi->mapGetInt(in, ints[i], 0, &err);
        PyObject *o = err ? NULL : PyLong_FromLongLong(v);
        if (o && PyDict_SetItemString(dict, ints[i], o) < 0)
            Py_CLEAR(dict);
        Py_XDECREF(o);
    }
    for (size_t i = 0; dict && i < sizeof strs / sizeof strs[0]; i++) {
        int err = 0;
        const char *v = vsapi->mapGetData(in, strs[i], 0, &err);
        PyObject *o = err ? NULL : PyUnicode_DecodeUTF8(v, vsapi->mapGetDataSize(in, strs[i], 0, NULL), "replace");
        if (o && PyDict_SetItemString(dict, strs[i], o) < 0)
            Py_CLEAR(dict);
        Py_XDECREF(o);
    }
    return dict;
}

/* plan[key] = [(namespace, function, {arg: int | str}), ...] -> Steps. Returns the count, -1 on error. */
static int parse_steps(PyObject *plan, const char *key, Step *steps, int max, const VSAPI *vsapi) {
    PyObject *list = PyDict_GetItemString(plan, key); /* borrowed */
    if (!list || !PyList_Check(list) || PyList_GET_SIZE(list) > max)
        return -1;
    int count = (int)PyList_GET_SIZE(list);
    for (int i = 0; i < count; i++) {
        const char *ns, *func;
        PyObject *kw;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(list, i), "ssO", &ns, &func, &kw) || !PyDict_Check(kw))
            return -1;
        snprintf(steps[i].ns, sizeof steps[i].ns, "%s", ns);
        snprintf(steps[i].func, sizeof steps[i].func, "%s", func);
        steps[i].args = vsapi->createMap();
        PyObject *k, *v;
        Py_ssize_t pos = 0;
        while (PyDict_Next(kw, &pos, &k, &v)) {
            const char *name = PyUnicode_AsUTF8(k);
            if (!name)
                return -1;
            if (PyLong_Check(v)) {
                vsapi->mapSetInt(steps[i].args, name, PyLong_AsLongLong(v), maAppend);
            } else if (PyUnicode_Check(v)) {
                Py_ssize_t len;
                const char *s = PyUnicode_AsUTF8AndSize(v, &len);
                if (!s)
                    return -1;
                vsapi->mapSetData(steps[i].args, name, s, (int)len, dtUtf8, maAppend);
            } else {
                return -1;
            }
        }
    }
    return count;
}

static void free_steps(Step *steps, int count, const VSAPI *vsapi) {
    for (int i = 0; i < count; i++)
        if (steps[i].args)
            vsapi->freeMap(steps[i].args);
}

/* Apply steps to *node (consumed and replaced); on failure returns 0 with msg set. */
static int run_steps(VSNode **node, Step *steps, int count, char *msg, VSCore *core, const VSAPI *vsapi) {
    for (int i = 0; i < count; i++) {
        VSPlugin *plugin = vsapi->getPluginByNamespace(steps[i].ns, core);
        if (!plugin) {
            snprintf(msg, MSG_SIZE, "namespace %s is missing", steps[i].ns);
            return 0;
        }
        vsapi->mapConsumeNode(steps[i].args, "clip", *node, maReplace);
        *node = NULL;
        VSMap *res = vsapi->invoke(plugin, steps[i].func, steps[i].args);
        const char *err = vsapi->mapGetError(res);
        if (err) {
            snprintf(msg, MSG_SIZE, "%s.%s: %s", steps[i].ns, steps[i].func, err);
            vsapi->freeMap(res);
            return 0;
        }
        *node = vsapi->mapGetNode(res, "clip", 0, NULL);
        vsapi->freeMap(res);
    }
    return 1;
}

#define MAX_STEPS 4

static void VS_CC esc_create(const VSMap *in, VSMap *out, void *user_data, VSCore *core, const VSAPI *vsapi) {
    (void)user_data;
    char msg[MSG_SIZE] = "";
    Step pre[MAX_STEPS] = {0}, post[MAX_STEPS] = {0};
    int npre = 0, npost = 0, scale = 0;
    PyObject *runner = NULL;

    if (!python_ready()) {
        vsapi->mapSetError(out, PREFIX "needs a Python host (a .vpy script, vspipe or the vapoursynth module)");
        return;
    }
    VSNode *node = vsapi->mapGetNode(in, "clip", 0, NULL);
    const VSVideoInfo *vi = vsapi->getVideoInfo(node);

    /* Frame 0's colour properties decide the YUV<->RGB conversion. Fetched without the GIL (the Python
     * binding calls plugins with it released), so upstream Python filters can run meanwhile. */
    const VSFrame *first = NULL;
    if (vi->format.colorFamily != cfUndefined && vi->width > 0 && vi->numFrames > 0) {
        char err[MSG_SIZE] = "";
        first = vsapi->getFrame(0, node, err, sizeof err);
        if (!first) {
            snprintf(msg, sizeof msg, "cannot read frame 0 of the clip: %s", err);
            goto fail;
        }
    }

    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *info = Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "color_family", vi->format.colorFamily,
                                   "sample_type", vi->format.sampleType, "bits", vi->format.bitsPerSample,
                                   "subsampling_w", vi->format.subSamplingW, "subsampling_h",
                                   vi->format.subSamplingH, "width", vi->width, "height", vi->height, "num_frames",
                                   vi->numFrames);
    PyObject *props = frame_props(vsapi, first);
    PyObject *args = arguments(in, vsapi);
    PyObject *mod = (info && props && args) ? PyImport_ImportModule("esc_stream.vapoursynth._native") : NULL;
    PyObject *res = mod ? PyObject_CallMethod(mod, "create", "OOO", info, props, args) : NULL;
    PyObject *plan = NULL, *borrowed = NULL;
    if (res && PyArg_ParseTuple(res, "OOi", &borrowed, &plan, &scale) && PyDict_Check(plan)) {
        runner = borrowed;
        Py_INCREF(runner);
        npre = parse_steps(plan, "pre", pre, MAX_STEPS, vsapi);
        npost = npre >= 0 ? parse_steps(plan, "post", post, MAX_STEPS, vsapi) : -1;
        PyObject *warnings = PyDict_GetItemString(plan, "warnings");
        for (Py_ssize_t i = 0; npost >= 0 && warnings && PyList_Check(warnings) && i < PyList_GET_SIZE(warnings); i++) {
            const char *w = PyUnicode_AsUTF8(PyList_GET_ITEM(warnings, i));
            if (w)
                vsapi->logMessage(mtWarning, w, core);
        }
        if ((npre < 0 || npost < 0) && !PyErr_Occurred())
            strcpy(msg, "malformed plan from esc_stream.vapoursynth._native.create");
    } else if (res && !PyErr_Occurred()) {
        strcpy(msg, "malformed result from esc_stream.vapoursynth._native.create");
    }
    if (PyErr_Occurred()) {
        if (!mod)
            strcpy(msg, "cannot import esc_stream.vapoursynth (is esc-stream installed in this Python?): ");
        py_error_message(msg + strlen(msg), sizeof msg - strlen(msg));
    }
    Py_XDECREF(res);
    Py_XDECREF(mod);
    Py_XDECREF(args);
    Py_XDECREF(props);
    Py_XDECREF(info);
    PyGILState_Release(gil);
    if (msg[0])
        goto fail;

    if (!run_steps(&node, pre, npre, msg, core, vsapi))
        goto fail;
    EscData *d = (EscData *)calloc(1, sizeof *d);
    d->node = node;
    d->runner = runner;
    d->vi = *vsapi->getVideoInfo(node);
    d->vi.width *= scale;
    d->vi.height *= scale;
    VSFilterDependency dep = {node, rpStrictSpatial};
    node = vsapi->createVideoFilter2("Upscale", &d->vi, esc_get_frame, esc_free, fmParallel, &dep, 1, d, core);
    runner = NULL; /* owned by the filter now */
    if (!node) {
        snprintf(msg, sizeof msg, "cannot create the filter");
        goto fail;
    }
    if (!run_steps(&node, post, npost, msg, core, vsapi))
        goto fail;
    vsapi->mapConsumeNode(out, "clip", node, maAppend);
    free_steps(pre, npre, vsapi);
    free_steps(post, npost, vsapi);
    vsapi->freeFrame(first);
    return;

fail:
    free_steps(pre, MAX_STEPS, vsapi); /* zero-initialised: unused entries have no map */
    free_steps(post, MAX_STEPS, vsapi);
    if (first)
        vsapi->freeFrame(first);
    if (node)
        vsapi->freeNode(node);
    release_runner(runner);
    char full[MSG_SIZE + 32];
    snprintf(full, sizeof full, PREFIX "%s", msg);
    vsapi->mapSetError(out, full);
}

VS_EXTERNAL_API(void) VapourSynthPluginInit2(VSPlugin *plugin, const VSPLUGINAPI *vspapi) {
    vspapi->configPlugin("io.github.esc-stream.esc", "esc", "ESC super-resolution (esc-stream)", VS_MAKE_VERSION(1, 0),
                         VAPOURSYNTH_API_VERSION, 0, plugin);
    vspapi->registerFunction("Upscale",
                             "clip:vnode;scale:int:opt;weights:data:opt;model:data:opt;tile:int:opt;overlap:int:opt;"
                             "device:data:opt;num_streams:int:opt;batch:int:opt;width:int:opt;height:int:opt;",
                             "clip:vnode;", esc_create, NULL, plugin);
}
