// Device queries of the CUDA build (declared in pyalign/bind.h).
#include <cuda_runtime.h>

namespace pyalign {

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) { cudaGetLastError(); return 0; }  // no driver/device: 0
  return n;
}

}  // namespace pyalign
