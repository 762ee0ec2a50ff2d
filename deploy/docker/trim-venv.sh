#!/bin/sh
# Run in an image's build stage, before the runtime stage copies the virtual environment.
# Takes out what a runtime with no compiler and no package installs never uses:
#   - torch's C++ headers, CMake files, C++ unit-test binaries and bundled protoc (~190 MB);
#   - the static symbol tables of torch's own libraries (strip --strip-unneeded, where binutils
#     is installed: ~100 MB; dynamic linking uses .dynsym, which stays). Other wheels' libraries
#     are left as they are: auditwheel-patched ones do not always survive strip;
#   - pip and setuptools (the runtime installs nothing).
# What torch loads at run time (its libraries, torch_shm_manager) stays, and it is checked.
# Usage: trim-venv.sh /opt/venv
set -eu
venv=${1:?usage: trim-venv.sh VENV}
site=$(echo "$venv"/lib/python3.*/site-packages)
torch=$site/torch
if [ -d "$torch" ]; then
    rm -rf "$torch/include" "$torch/test" "$torch/share/cmake" "$torch/lib/libtorchbind_test.so"
    find "$torch/bin" -mindepth 1 ! -name torch_shm_manager -exec rm -rf {} +
    if command -v strip >/dev/null; then
        find "$torch/lib" -name '*.so*' -type f -exec strip --strip-unneeded {} +
    fi
    "$venv/bin/python" -c 'import torch; assert (torch.ones(2, 2) @ torch.ones(2, 2)).sum() == 8'
fi
"$venv/bin/python" -m pip uninstall --quiet --yes pip setuptools
