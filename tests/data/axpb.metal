// Elementwise test kernel with a parameter struct (AxpbParams is injected).

template <typename T>
METAL_FUNC void axpb_kernel(const device T* x, device T* y, const device AxpbParams* p,
                            uint3 gid) {
  uint i = gid.x;
  if (i < p->n) {
    y[i] = static_cast<T>(p->a * float(x[i]) + p->b);
  }
}
