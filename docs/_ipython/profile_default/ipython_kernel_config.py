# The kernel that executes the quickstart notebook during `make docs`: its
# start-up warning about unencrypted TCP on localhost is noise in the build
# log (the kernel and the build talk over the loopback only); errors still show.
c.IPKernelApp.log_level = 'ERROR'  # noqa: F821 (`c` is IPython's config object)
