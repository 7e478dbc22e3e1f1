// Row chunk loads and stores: E elements of T per chunk, converted to float.
//
// E == 1: one element. E * sizeof(T) == 16: one 16-byte vector load/store
// (uint4); chunk c covers elements [c * E, (c + 1) * E) and the row pointer
// must be 16-byte aligned (callers check that the row length in bytes is a
// multiple of 16; MLX buffers are aligned). The choice is a template
// argument, so only the chosen path is instantiated.

template <typename T, int E>
struct RowIO;

template <typename T>
struct RowIO<T, 1> {
  static METAL_FUNC void load(const device T* p, uint c, thread float* v) {
    v[0] = float(p[c]);
  }
  static METAL_FUNC void store(device T* p, uint c, thread const float* v) {
    p[c] = static_cast<T>(v[0]);
  }
};

// 4-byte types (float): four per chunk.
template <typename T>
struct RowIO<T, 4> {
  static METAL_FUNC void load(const device T* p, uint c, thread float* v) {
    uint4 u = reinterpret_cast<const device uint4*>(p)[c];
    v[0] = float(as_type<T>(u.x));
    v[1] = float(as_type<T>(u.y));
    v[2] = float(as_type<T>(u.z));
    v[3] = float(as_type<T>(u.w));
  }
  static METAL_FUNC void store(device T* p, uint c, thread const float* v) {
    uint4 u = uint4(as_type<uint>(static_cast<T>(v[0])), as_type<uint>(static_cast<T>(v[1])),
                    as_type<uint>(static_cast<T>(v[2])), as_type<uint>(static_cast<T>(v[3])));
    reinterpret_cast<device uint4*>(p)[c] = u;
  }
};

// 2-byte types (half, bfloat): eight per chunk.
template <typename T>
METAL_FUNC float row_io_lo(uint w) {
  return float(as_type<T>(ushort(w & 0xffffu)));
}
template <typename T>
METAL_FUNC float row_io_hi(uint w) {
  return float(as_type<T>(ushort(w >> 16)));
}
template <typename T>
METAL_FUNC uint row_io_pack(float a, float b) {
  return uint(as_type<ushort>(static_cast<T>(a))) |
         (uint(as_type<ushort>(static_cast<T>(b))) << 16);
}

template <typename T>
struct RowIO<T, 8> {
  static METAL_FUNC void load(const device T* p, uint c, thread float* v) {
    uint4 u = reinterpret_cast<const device uint4*>(p)[c];
    v[0] = row_io_lo<T>(u.x);
    v[1] = row_io_hi<T>(u.x);
    v[2] = row_io_lo<T>(u.y);
    v[3] = row_io_hi<T>(u.y);
    v[4] = row_io_lo<T>(u.z);
    v[5] = row_io_hi<T>(u.z);
    v[6] = row_io_lo<T>(u.w);
    v[7] = row_io_hi<T>(u.w);
  }
  static METAL_FUNC void store(device T* p, uint c, thread const float* v) {
    uint4 u = uint4(row_io_pack<T>(v[0], v[1]), row_io_pack<T>(v[2], v[3]),
                    row_io_pack<T>(v[4], v[5]), row_io_pack<T>(v[6], v[7]));
    reinterpret_cast<device uint4*>(p)[c] = u;
  }
};

// Elements per 16 bytes of T.
template <typename T>
struct RowVec {
  static constexpr int E = 16 / int(sizeof(T));
};
