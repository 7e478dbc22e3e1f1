// Row chunk loads and stores: E elements of T per chunk, converted to float.
// load_raw/unpack split a load in two, so a caller can issue every load of a
// row first and keep the chunks packed (Raw: 4 registers per 16 bytes, not one
// per element) until it needs the floats.
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
  typedef T Raw;
  static METAL_FUNC Raw zero() { return T(0); }
  static METAL_FUNC Raw load_raw(const device T* p, uint c) { return p[c]; }
  static METAL_FUNC void unpack(Raw r, thread float* v) { v[0] = float(r); }
  static METAL_FUNC Raw pack(thread const float* v) { return static_cast<T>(v[0]); }
  static METAL_FUNC void store_raw(device T* p, uint c, Raw r) { p[c] = r; }
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
  typedef uint4 Raw;
  static METAL_FUNC Raw zero() { return uint4(0u, 0u, 0u, 0u); }
  static METAL_FUNC Raw load_raw(const device T* p, uint c) {
    return reinterpret_cast<const device uint4*>(p)[c];
  }
  static METAL_FUNC void unpack(Raw u, thread float* v) {
    v[0] = float(as_type<T>(u.x));
    v[1] = float(as_type<T>(u.y));
    v[2] = float(as_type<T>(u.z));
    v[3] = float(as_type<T>(u.w));
  }
  static METAL_FUNC Raw pack(thread const float* v) {
    return uint4(as_type<uint>(static_cast<T>(v[0])), as_type<uint>(static_cast<T>(v[1])),
                 as_type<uint>(static_cast<T>(v[2])), as_type<uint>(static_cast<T>(v[3])));
  }
  static METAL_FUNC void store_raw(device T* p, uint c, Raw r) {
    reinterpret_cast<device uint4*>(p)[c] = r;
  }
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
  typedef uint4 Raw;
  static METAL_FUNC Raw zero() { return uint4(0u, 0u, 0u, 0u); }
  static METAL_FUNC Raw load_raw(const device T* p, uint c) {
    return reinterpret_cast<const device uint4*>(p)[c];
  }
  static METAL_FUNC void unpack(Raw u, thread float* v) {
    v[0] = row_io_lo<T>(u.x);
    v[1] = row_io_hi<T>(u.x);
    v[2] = row_io_lo<T>(u.y);
    v[3] = row_io_hi<T>(u.y);
    v[4] = row_io_lo<T>(u.z);
    v[5] = row_io_hi<T>(u.z);
    v[6] = row_io_lo<T>(u.w);
    v[7] = row_io_hi<T>(u.w);
  }
  static METAL_FUNC Raw pack(thread const float* v) {
    return uint4(row_io_pack<T>(v[0], v[1]), row_io_pack<T>(v[2], v[3]),
                 row_io_pack<T>(v[4], v[5]), row_io_pack<T>(v[6], v[7]));
  }
  static METAL_FUNC void store_raw(device T* p, uint c, Raw r) {
    reinterpret_cast<device uint4*>(p)[c] = r;
  }
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
