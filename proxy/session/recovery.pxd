from proxy.session.attachment cimport Attachment

cdef class Recovery(Attachment):
    pass
