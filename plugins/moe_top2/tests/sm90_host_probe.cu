// Host-only probe of the sm_90a prefill path's CUTLASS GEMMs: asks CUTLASS itself (not our
// constants) for the workspace a grouped GEMM needs at each SM count the path accepts, and checks
// that the workspace region moe_top2.h reserves (kSm90GemmWorkspaceBytes) holds it. Touches no
// GPU: with an SM count given, get_workspace_size and can_implement are pure host functions.
// Then, where no GPU answers, checks that the path refuses to launch when CUTLASS could not build
// its TMA descriptors. Built by tests/plugins/test_kernels_build.py with the library's sm_90a
// flags; prints one line per fact and exits 1 on a violation.
#include "../prefill_sm90.cu"

#include <cstdio>
#include <cstring>

namespace {

template <typename T>
int probe(const char* name) {
    using K = typename moe::Grouped<T>::Kernel;
    int bad = 0;
    size_t most = 0;
    for (int sms = 1; sms <= moe::kSm90MaxSms; ++sms) {
        for (int groups : {2, 16, 128}) {  // GEMM1 of one expert, Mixtral's GEMM1, many experts
            typename K::Arguments args{};
            args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
            args.problem_shape = {groups, nullptr, nullptr};  // shapes only on the device, as in the path
            args.hw_info.sm_count = sms;
            const size_t need = K::get_workspace_size(args);
            most = need > most ? need : most;
            if (need > moe::kSm90GemmWorkspaceBytes) {
                std::printf("%s: %d SMs, %d groups need %zu workspace bytes > %zu reserved\n", name, sms, groups, need,
                            moe::kSm90GemmWorkspaceBytes);
                bad = 1;
            }
            if (!K::can_implement(args)) {
                std::printf("%s: CUTLASS refuses %d groups on %d SMs\n", name, groups, sms);
                bad = 1;
            }
        }
    }
    std::printf("%s workspace_max=%zu reserved=%zu smem=%d params=%zu threads=%d\n", name, most,
                moe::kSm90GemmWorkspaceBytes, static_cast<int>(K::SharedStorageSize), sizeof(typename K::Params),
                static_cast<int>(K::MaxThreadsPerBlock));
    return bad;
}

// Without a CUDA driver, CUTLASS cannot build the TMA descriptors (cuTensorMapEncodeTiled): the
// path must then refuse before launching, not launch on blank descriptors. Only where no GPU
// answers (with one, the descriptors build and the fake pointers below would reach a launch).
int refuses_blank_descriptors() {
    int devices = 0;
    if (cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) {
        std::printf("blank descriptors: skipped, a GPU is present\n");
        return 0;
    }
    cudaGetLastError();
    alignas(256) static char args[64 * 1024], gemm_ws[moe::kSm90GemmWorkspaceBytes];
    char* p = args;
    const auto g = moe::carve_groups<half>(p, 16);
    char msg[512] = "";
    const int rc = moe::run_grouped<half>(g, 16, gemm_ws, 0, 132, nullptr, msg, sizeof(msg), "GEMM1");
    const bool ok = rc == cudaErrorUnknown && std::strstr(msg, "could not build the TMA descriptors of GEMM1");
    std::printf("blank descriptors: rc=%d msg=%s\n", rc, msg);
    return ok ? 0 : 1;
}

}  // namespace

int main() {
    const int bad = probe<half>("fp16") | probe<__nv_bfloat16>("bf16") | refuses_blank_descriptors();
    std::printf(bad ? "sm90_host_probe: FAIL\n" : "sm90_host_probe: PASS\n");
    return bad;
}
