"""Services over the runtime (DESIGN §10): the DICOM node (``serve.dicom_node``)."""
