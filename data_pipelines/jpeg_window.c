/* Decode one window of a colour JPEG, and nothing below it: libjpeg-turbo's partial
 * decompression (jpeg_skip_scanlines, jpeg_crop_scanline), which neither PIL nor OpenCV
 * exposes.
 *
 * Why: a RandomResizedCrop window covers about half of the image on average, yet a full
 * decode runs the inverse DCT, upsampling and colour conversion on every pixel. Here the rows
 * above the window are only entropy-decoded, the columns beside it skip the inverse DCT from
 * the first iMCU column outside it, and decoding stops at the window's last row. The window's
 * pixels are those of a full decode (tests/test_decode.py checks them against PIL's and
 * OpenCV's decoders).
 *
 * decode(data, top, left, height, width, out) -> None
 *   data: the file's bytes (any contiguous buffer); out: a writable contiguous buffer of
 *   height * width * 3 bytes, filled as RGB rows. Raises ValueError where libjpeg stops (not
 *   a JPEG, a broken header or marker), for a window outside the image, or a file that is not
 *   3-channel. libjpeg's warnings (corrupt entropy data, extraneous bytes before a marker,
 *   a premature end of data) are ignored, as PIL and OpenCV ignore them: whether a file
 *   fails must not depend on which window a seed draws. decode.py sends files without their
 *   end-of-image marker (truncated) to PIL, which raises. The GIL is released while decoding.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>

#define MARGIN 8     /* pixels decoded beside the window: more than any upsampling reads */

struct window_error {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

static void stop_on_error(j_common_ptr cinfo)
{
    struct window_error *err = (struct window_error *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void quiet(j_common_ptr cinfo, int level)
{
    (void)cinfo;                 /* warnings and trace messages: not printed, not fatal */
    (void)level;
}

/* 0 on success; else a message in err->message. */
static int decode_window(const unsigned char *data, size_t size, int top, int left,
                         int height, int width, unsigned char *out,
                         struct window_error *err)
{
    struct jpeg_decompress_struct cinfo;
    unsigned char *volatile row = NULL;
    volatile int failed = 0;

    cinfo.err = jpeg_std_error(&err->pub);
    err->pub.error_exit = stop_on_error;
    err->pub.emit_message = quiet;
    err->message[0] = '\0';
    jpeg_create_decompress(&cinfo);
    if (setjmp(err->jump)) {
        failed = 1;
    } else {
        jpeg_mem_src(&cinfo, data, (unsigned long)size);
        jpeg_read_header(&cinfo, TRUE);
        if (cinfo.num_components != 3) {
            snprintf(err->message, sizeof err->message, "%d channels, expected 3",
                     cinfo.num_components);
            failed = 1;
        } else {
            cinfo.out_color_space = JCS_RGB;
            cinfo.dct_method = JDCT_ISLOW;       /* PIL's and OpenCV's default */
            jpeg_start_decompress(&cinfo);
            if (top < 0 || left < 0 || height <= 0 || width <= 0
                || (JDIMENSION)(top + height) > cinfo.output_height
                || (JDIMENSION)(left + width) > cinfo.output_width) {
                snprintf(err->message, sizeof err->message,
                         "window %dx%d at (%d, %d) outside the %ux%u image", width, height,
                         left, top, cinfo.output_width, cinfo.output_height);
                failed = 1;
            } else {
                /* A margin each side: chroma upsampling at a cropped edge would repeat the
                 * edge sample instead of reading its neighbour, as a full decode does. */
                int x_from = left > MARGIN ? left - MARGIN : 0;
                int x_to = left + width + MARGIN;
                if ((JDIMENSION)x_to > cinfo.output_width)
                    x_to = (int)cinfo.output_width;
                JDIMENSION x0 = (JDIMENSION)x_from, cols = (JDIMENSION)(x_to - x_from);
                jpeg_crop_scanline(&cinfo, &x0, &cols);   /* widened to iMCU columns */
                row = malloc((size_t)cinfo.output_width * 3);
                if (row == NULL) {
                    snprintf(err->message, sizeof err->message, "out of memory");
                    failed = 1;
                } else {
                    size_t shift = (size_t)(left - (int)x0) * 3, line = (size_t)width * 3;
                    JSAMPROW rows[1] = {row};
                    if (top > 0 && jpeg_skip_scanlines(&cinfo, (JDIMENSION)top)
                                       != (JDIMENSION)top) {
                        snprintf(err->message, sizeof err->message, "cannot skip rows");
                        failed = 1;
                    }
                    for (int y = 0; !failed && y < height; y++) {
                        if (jpeg_read_scanlines(&cinfo, rows, 1) != 1) {
                            snprintf(err->message, sizeof err->message, "row %d missing",
                                     top + y);
                            failed = 1;
                        } else {
                            memcpy(out + (size_t)y * line, row + shift, line);
                        }
                    }
                }
            }
        }
    }
    free(row);
    jpeg_destroy_decompress(&cinfo);     /* also ends a decode stopped early */
    return failed;
}

static PyObject *decode(PyObject *self, PyObject *args)
{
    Py_buffer data, out;
    int top, left, height, width, failed;
    struct window_error err;

    if (!PyArg_ParseTuple(args, "y*iiiiw*", &data, &top, &left, &height, &width, &out))
        return NULL;
    if (height <= 0 || width <= 0 || out.len < (Py_ssize_t)height * width * 3) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&out);
        PyErr_Format(PyExc_ValueError, "out holds %zd bytes, expected %d x %d x 3", out.len,
                     height, width);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    failed = decode_window((const unsigned char *)data.buf, (size_t)data.len, top, left,
                           height, width, (unsigned char *)out.buf, &err);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    if (failed) {
        PyErr_Format(PyExc_ValueError, "JPEG: %s", err.message);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS,
     "decode(data, top, left, height, width, out): the window's RGB rows into out."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "jpeg_window", "Partial JPEG decoding (libjpeg-turbo).", -1,
    methods,
};

PyMODINIT_FUNC PyInit_jpeg_window(void) { return PyModule_Create(&module); }
