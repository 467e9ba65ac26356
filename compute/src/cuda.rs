//! The CUDA engine (cargo feature `cuda`): the same arithmetic as the
//! scalar reference, in kernels NVRTC compiles at run time. The CUDA driver
//! and NVRTC libraries are loaded when the engine is created, so a build
//! with the feature runs (and its tests skip, saying why) on machines
//! without them.
//!
//! Bit-for-bit agreement with [`crate::ScalarEngine`]: kernels are compiled
//! without fused multiply-add, flush-to-zero or approximate division and
//! square root; half-precision conversions use the PTX `cvt.rn` (round to
//! nearest even) and exact widening instructions; min/max follow the
//! reference's NaN and signed-zero rules. NaN payloads may differ.
//!
//! [`ComputeEngine`] works on host slices, so each call copies to the
//! device and back; [`CudaEngine::bench`] measures the kernels on
//! device-resident buffers against a device-to-device copy.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use half::{bf16, f16};

use crate::{
    same_len, AdamParams, ComputeEngine, ComputeError, MomentumParams, ReduceOp, SgdParams,
};

const KERNELS: &str = r#"
typedef unsigned short u16;
typedef unsigned long long u64;

__device__ float bf16_to_f32(u16 h) { return __uint_as_float(((unsigned int)h) << 16); }
__device__ u16 f32_to_bf16(float x) { u16 r; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x)); return r; }
__device__ float f16_to_f32(u16 h) { float r; asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h)); return r; }
__device__ u16 f32_to_f16(float x) { u16 r; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x)); return r; }

__device__ float pmin(float a, float b) {
    if (a != a || b != b) return __int_as_float(0x7fc00000);
    if (a < b) return a;
    if (b < a) return b;
    return __int_as_float(__float_as_int(a) | __float_as_int(b));
}
__device__ float pmax(float a, float b) {
    if (a != a || b != b) return __int_as_float(0x7fc00000);
    if (a > b) return a;
    if (b > a) return b;
    return __int_as_float(__float_as_int(a) & __float_as_int(b));
}
/* op: 0 sum (and mean), 1 min, 2 max */
__device__ float combine(int op, float a, float b) {
    return op == 1 ? pmin(a, b) : (op == 2 ? pmax(a, b) : a + b);
}

#define EACH(n) for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < (n); i += (u64)blockDim.x * gridDim.x)

extern "C" __global__ void reduce_f32(float* acc, const float* src, u64 n, int op) {
    EACH(n) acc[i] = combine(op, acc[i], src[i]);
}
extern "C" __global__ void reduce_bf16(u16* acc, const u16* src, u64 n, int op) {
    EACH(n) acc[i] = f32_to_bf16(combine(op, bf16_to_f32(acc[i]), bf16_to_f32(src[i])));
}
extern "C" __global__ void reduce_f16(u16* acc, const u16* src, u64 n, int op) {
    EACH(n) acc[i] = f32_to_f16(combine(op, f16_to_f32(acc[i]), f16_to_f32(src[i])));
}
extern "C" __global__ void scale_f32(float* x, u64 n, float f) { EACH(n) x[i] = x[i] * f; }
extern "C" __global__ void scale_bf16(u16* x, u64 n, float f) { EACH(n) x[i] = f32_to_bf16(bf16_to_f32(x[i]) * f); }
extern "C" __global__ void scale_f16(u16* x, u64 n, float f) { EACH(n) x[i] = f32_to_f16(f16_to_f32(x[i]) * f); }
extern "C" __global__ void f32_to_bf16_k(const float* s, u16* d, u64 n) { EACH(n) d[i] = f32_to_bf16(s[i]); }
extern "C" __global__ void bf16_to_f32_k(const u16* s, float* d, u64 n) { EACH(n) d[i] = bf16_to_f32(s[i]); }
extern "C" __global__ void f32_to_f16_k(const float* s, u16* d, u64 n) { EACH(n) d[i] = f32_to_f16(s[i]); }
extern "C" __global__ void f16_to_f32_k(const u16* s, float* d, u64 n) { EACH(n) d[i] = f16_to_f32(s[i]); }

extern "C" __global__ void sgd(float* p, const float* g, u64 n, float lr, float wd) {
    EACH(n) { float gg = g[i] + wd * p[i]; p[i] = p[i] - lr * gg; }
}
extern "C" __global__ void momentum(float* p, const float* g, float* v, u64 n,
                                    float lr, float mom, float wd, int nesterov) {
    EACH(n) {
        float gg = g[i] + wd * p[i];
        float vv = mom * v[i] + gg;
        float d = nesterov ? gg + mom * vv : vv;
        p[i] = p[i] - lr * d;
        v[i] = vv;
    }
}
extern "C" __global__ void adam(float* p, const float* g, float* m, float* v, u64 n,
                                float lr, float b1, float b2, float eps, float wd,
                                float bc1, float bc2) {
    EACH(n) {
        float gg = g[i] + wd * p[i];
        float mm = b1 * m[i] + (1.0f - b1) * gg;
        float vv = b2 * v[i] + (1.0f - b2) * (gg * gg);
        float mh = mm * bc1;
        float vh = vv * bc2;
        p[i] = p[i] - lr * mh / (sqrtf(vh) + eps);
        m[i] = mm;
        v[i] = vv;
    }
}
"#;

const FUNCTIONS: [&str; 13] = [
    "reduce_f32",
    "reduce_bf16",
    "reduce_f16",
    "scale_f32",
    "scale_bf16",
    "scale_f16",
    "f32_to_bf16_k",
    "bf16_to_f32_k",
    "f32_to_f16_k",
    "f16_to_f32_k",
    "sgd",
    "momentum",
    "adam",
];

/// Why no CUDA engine could be made.
#[derive(Debug, thiserror::Error)]
pub enum CudaUnavailable {
    /// The driver or NVRTC library is not installed.
    #[error("{0} is not installed (no NVIDIA driver / CUDA runtime compiler on this machine)")]
    NoLibrary(&'static str),
    /// The driver failed (no device, say).
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// The kernels did not compile.
    #[error("NVRTC could not compile the kernels: {0}")]
    Compile(String),
}

/// A GPU compute engine on one device.
#[derive(Debug)]
pub struct CudaEngine {
    device: String,
    stream: Arc<CudaStream>,
    functions: Vec<CudaFunction>,
}

fn driver(e: impl std::fmt::Debug) -> CudaUnavailable {
    CudaUnavailable::Driver(format!("{e:?}"))
}

/// Grid for `n` elements: enough blocks to fill the device, grid-stride
/// loops for the rest.
fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn op_code(op: ReduceOp) -> i32 {
    match op {
        ReduceOp::Sum | ReduceOp::Mean => 0,
        ReduceOp::Min => 1,
        ReduceOp::Max => 2,
    }
}

/// A failure of the device in the middle of an operation: the trait has no
/// error for it, and a collective must not go on with a wrong result.
fn fatal(e: impl std::fmt::Debug) -> ! {
    panic!("CUDA engine failure: {e:?}")
}

/// Compiles the kernels with NVRTC (no GPU needed); the PTX.
pub fn compile_kernels() -> Result<String, CudaUnavailable> {
    // SAFETY: only checks whether the library can be loaded.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaUnavailable::NoLibrary("libnvrtc"));
    }
    let ptx = compile_ptx_with_opts(
        KERNELS,
        CompileOptions {
            ftz: Some(false),
            prec_sqrt: Some(true),
            prec_div: Some(true),
            fmad: Some(false),
            // bf16 conversions (`cvt.rn.bf16.f32`) need sm_80: A100, H100
            // and newer.
            arch: Some("compute_80"),
            ..Default::default()
        },
    )
    .map_err(|e| CudaUnavailable::Compile(format!("{e:?}")))?;
    Ok(ptx.to_src())
}

impl CudaEngine {
    /// The engine on device `ordinal`, or why there is none.
    pub fn new(ordinal: usize) -> Result<CudaEngine, CudaUnavailable> {
        // SAFETY: only checks whether the libraries can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaUnavailable::NoLibrary("libcuda"));
        }
        // SAFETY: as above.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(CudaUnavailable::NoLibrary("libnvrtc"));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver)?;
        let device = ctx.name().map_err(driver)?;
        let ptx = cudarc::nvrtc::Ptx::from_src(compile_kernels()?);
        let module = ctx.load_module(ptx).map_err(driver)?;
        let functions = FUNCTIONS
            .iter()
            .map(|f| module.load_function(f).map_err(driver))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CudaEngine {
            device,
            stream: ctx.default_stream(),
            functions,
        })
    }

    fn f(&self, name: &str) -> &CudaFunction {
        let i = FUNCTIONS.iter().position(|f| *f == name).expect("a kernel");
        &self.functions[i]
    }

    /// Runs `kernel` over `a` (in place) with `b` (read) and `args`.
    fn binary<T: cudarc::driver::DeviceRepr + Copy>(
        &self,
        kernel: &str,
        a: &mut [T],
        b: &[T],
        op: i32,
    ) {
        let s = &self.stream;
        let mut da = s.clone_htod(a).unwrap_or_else(|e| fatal(e));
        let db = s.clone_htod(b).unwrap_or_else(|e| fatal(e));
        let n = a.len() as u64;
        let mut l = s.launch_builder(self.f(kernel));
        l.arg(&mut da).arg(&db).arg(&n).arg(&op);
        // SAFETY: the kernel's parameters are the arguments pushed above,
        // buffers of n elements.
        unsafe { l.launch(grid(a.len())) }.unwrap_or_else(|e| fatal(e));
        s.memcpy_dtoh(&da, a).unwrap_or_else(|e| fatal(e));
    }

    fn scale<T: cudarc::driver::DeviceRepr + Copy>(&self, kernel: &str, x: &mut [T], f: f32) {
        let s = &self.stream;
        let mut dx = s.clone_htod(x).unwrap_or_else(|e| fatal(e));
        let n = x.len() as u64;
        let mut l = s.launch_builder(self.f(kernel));
        l.arg(&mut dx).arg(&n).arg(&f);
        // SAFETY: as in `binary`.
        unsafe { l.launch(grid(x.len())) }.unwrap_or_else(|e| fatal(e));
        s.memcpy_dtoh(&dx, x).unwrap_or_else(|e| fatal(e));
    }

    fn cast<S, D>(&self, kernel: &str, src: &[S], dst: &mut [D]) -> Result<(), ComputeError>
    where
        S: cudarc::driver::DeviceRepr + Copy,
        D: cudarc::driver::DeviceRepr + Copy + cudarc::driver::ValidAsZeroBits,
    {
        same_len("dst", dst.len(), src.len())?;
        let s = &self.stream;
        let ds = s.clone_htod(src).unwrap_or_else(|e| fatal(e));
        let mut dd = s.alloc_zeros::<D>(dst.len()).unwrap_or_else(|e| fatal(e));
        let n = src.len() as u64;
        let mut l = s.launch_builder(self.f(kernel));
        l.arg(&ds).arg(&mut dd).arg(&n);
        // SAFETY: as in `binary`.
        unsafe { l.launch(grid(src.len())) }.unwrap_or_else(|e| fatal(e));
        s.memcpy_dtoh(&dd, dst).unwrap_or_else(|e| fatal(e));
        Ok(())
    }

    /// Device-resident figures for `bytes` of f32: GB/s of the sum-reduce
    /// kernel (counting the bytes read and written, as for memcpy: 3 per
    /// element byte) and of a device-to-device copy (2 per byte), medians
    /// of `samples` timed runs.
    pub fn bench(&self, bytes: usize, samples: usize) -> Result<(f64, f64), CudaUnavailable> {
        let n = bytes / 4;
        let s = &self.stream;
        let mut acc = s.alloc_zeros::<f32>(n).map_err(driver)?;
        let src = s.alloc_zeros::<f32>(n).map_err(driver)?;
        let mut copy = s.alloc_zeros::<f32>(n).map_err(driver)?;
        let nn = n as u64;
        let op = 0i32;
        let time = |f: &mut dyn FnMut() -> Result<(), CudaUnavailable>| {
            let mut t = Vec::new();
            for _ in 0..samples.max(1) + 1 {
                s.synchronize().map_err(driver)?;
                let start = std::time::Instant::now();
                f()?;
                s.synchronize().map_err(driver)?;
                t.push(start.elapsed().as_secs_f64());
            }
            t.remove(0); // warm-up
            t.sort_by(f64::total_cmp);
            Ok::<f64, CudaUnavailable>(t[t.len() / 2])
        };
        let reduce = time(&mut || {
            let mut l = s.launch_builder(self.f("reduce_f32"));
            l.arg(&mut acc).arg(&src).arg(&nn).arg(&op);
            // SAFETY: as in `binary`.
            unsafe { l.launch(grid(n)) }.map_err(driver)?;
            Ok(())
        })?;
        let d2d = time(&mut || s.memcpy_dtod(&src, &mut copy).map_err(driver))?;
        let gb = bytes as f64 / 1e9;
        Ok((3.0 * gb / reduce, 2.0 * gb / d2d))
    }
}

impl ComputeEngine for CudaEngine {
    fn name(&self) -> String {
        format!("cuda ({})", self.device)
    }

    fn reduce_f32(&self, op: ReduceOp, acc: &mut [f32], src: &[f32]) -> Result<(), ComputeError> {
        same_len("src", src.len(), acc.len())?;
        self.binary("reduce_f32", acc, src, op_code(op));
        Ok(())
    }

    fn reduce_bf16(
        &self,
        op: ReduceOp,
        acc: &mut [bf16],
        src: &[bf16],
    ) -> Result<(), ComputeError> {
        same_len("src", src.len(), acc.len())?;
        let a: &mut [u16] = bytemuck::cast_slice_mut(acc);
        self.binary("reduce_bf16", a, bytemuck::cast_slice(src), op_code(op));
        Ok(())
    }

    fn reduce_f16(&self, op: ReduceOp, acc: &mut [f16], src: &[f16]) -> Result<(), ComputeError> {
        same_len("src", src.len(), acc.len())?;
        let a: &mut [u16] = bytemuck::cast_slice_mut(acc);
        self.binary("reduce_f16", a, bytemuck::cast_slice(src), op_code(op));
        Ok(())
    }

    fn scale_f32(&self, x: &mut [f32], factor: f32) {
        self.scale("scale_f32", x, factor);
    }

    fn scale_bf16(&self, x: &mut [bf16], factor: f32) {
        self.scale(
            "scale_bf16",
            bytemuck::cast_slice_mut::<bf16, u16>(x),
            factor,
        );
    }

    fn scale_f16(&self, x: &mut [f16], factor: f32) {
        self.scale("scale_f16", bytemuck::cast_slice_mut::<f16, u16>(x), factor);
    }

    fn cast_f32_to_bf16(&self, src: &[f32], dst: &mut [bf16]) -> Result<(), ComputeError> {
        self.cast(
            "f32_to_bf16_k",
            src,
            bytemuck::cast_slice_mut::<bf16, u16>(dst),
        )
    }

    fn cast_bf16_to_f32(&self, src: &[bf16], dst: &mut [f32]) -> Result<(), ComputeError> {
        self.cast("bf16_to_f32_k", bytemuck::cast_slice::<bf16, u16>(src), dst)
    }

    fn cast_f32_to_f16(&self, src: &[f32], dst: &mut [f16]) -> Result<(), ComputeError> {
        self.cast(
            "f32_to_f16_k",
            src,
            bytemuck::cast_slice_mut::<f16, u16>(dst),
        )
    }

    fn cast_f16_to_f32(&self, src: &[f16], dst: &mut [f32]) -> Result<(), ComputeError> {
        self.cast("f16_to_f32_k", bytemuck::cast_slice::<f16, u16>(src), dst)
    }

    fn sgd(&self, params: &mut [f32], grads: &[f32], h: &SgdParams) -> Result<(), ComputeError> {
        same_len("grads", grads.len(), params.len())?;
        let s = &self.stream;
        let mut p = s.clone_htod(params).unwrap_or_else(|e| fatal(e));
        let g = s.clone_htod(grads).unwrap_or_else(|e| fatal(e));
        let n = params.len() as u64;
        let mut l = s.launch_builder(self.f("sgd"));
        l.arg(&mut p)
            .arg(&g)
            .arg(&n)
            .arg(&h.lr)
            .arg(&h.weight_decay);
        // SAFETY: as in `binary`.
        unsafe { l.launch(grid(params.len())) }.unwrap_or_else(|e| fatal(e));
        s.memcpy_dtoh(&p, params).unwrap_or_else(|e| fatal(e));
        Ok(())
    }

    fn momentum(
        &self,
        params: &mut [f32],
        grads: &[f32],
        velocity: &mut [f32],
        h: &MomentumParams,
    ) -> Result<(), ComputeError> {
        same_len("grads", grads.len(), params.len())?;
        same_len("velocity", velocity.len(), params.len())?;
        let s = &self.stream;
        let mut p = s.clone_htod(params).unwrap_or_else(|e| fatal(e));
        let g = s.clone_htod(grads).unwrap_or_else(|e| fatal(e));
        let mut v = s.clone_htod(velocity).unwrap_or_else(|e| fatal(e));
        let n = params.len() as u64;
        let nesterov = i32::from(h.nesterov);
        let mut l = s.launch_builder(self.f("momentum"));
        l.arg(&mut p)
            .arg(&g)
            .arg(&mut v)
            .arg(&n)
            .arg(&h.lr)
            .arg(&h.momentum)
            .arg(&h.weight_decay)
            .arg(&nesterov);
        // SAFETY: as in `binary`.
        unsafe { l.launch(grid(params.len())) }.unwrap_or_else(|e| fatal(e));
        s.memcpy_dtoh(&p, params).unwrap_or_else(|e| fatal(e));
        s.memcpy_dtoh(&v, velocity).unwrap_or_else(|e| fatal(e));
        Ok(())
    }

    fn adam(
        &self,
        params: &mut [f32],
        grads: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        h: &AdamParams,
    ) -> Result<(), ComputeError> {
        same_len("grads", grads.len(), params.len())?;
        same_len("m", m.len(), params.len())?;
        same_len("v", v.len(), params.len())?;
        let (bc1, bc2) = h.bias_corrections();
        let s = &self.stream;
        let mut dp = s.clone_htod(params).unwrap_or_else(|e| fatal(e));
        let dg = s.clone_htod(grads).unwrap_or_else(|e| fatal(e));
        let mut dm = s.clone_htod(m).unwrap_or_else(|e| fatal(e));
        let mut dv = s.clone_htod(v).unwrap_or_else(|e| fatal(e));
        let n = params.len() as u64;
        let mut l = s.launch_builder(self.f("adam"));
        l.arg(&mut dp)
            .arg(&dg)
            .arg(&mut dm)
            .arg(&mut dv)
            .arg(&n)
            .arg(&h.lr)
            .arg(&h.beta1)
            .arg(&h.beta2)
            .arg(&h.eps)
            .arg(&h.weight_decay)
            .arg(&bc1)
            .arg(&bc2);
        // SAFETY: as in `binary`.
        unsafe { l.launch(grid(params.len())) }.unwrap_or_else(|e| fatal(e));
        s.memcpy_dtoh(&dp, params).unwrap_or_else(|e| fatal(e));
        s.memcpy_dtoh(&dm, m).unwrap_or_else(|e| fatal(e));
        s.memcpy_dtoh(&dv, v).unwrap_or_else(|e| fatal(e));
        Ok(())
    }
}
