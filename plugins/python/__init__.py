"""Python side of the MoETop2 plugin: the TensorRT plugin class and the kernels' ctypes binding."""
