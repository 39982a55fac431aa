// Included by the generated kernel tables (emu/gen_registry.sh): builds an EmuKernel from a
// kernel's function pointer. The thunk copies each parameter out of the CUDA-style array
// (args[i] points to parameter i, as cuLaunchKernel's kernelParams) by the deduced parameter
// type and calls the kernel; param_sizes are sizeof of those types as this host build sees them.
#pragma once
#include <cstring>
#include <type_traits>
#include <utility>

#include "engine.h"

namespace tpo_emu {
template <typename T>
inline T load_param(void* p) {
    static_assert(std::is_trivially_copyable<T>::value, "kernel parameters are copied bytewise");
    T v;
    std::memcpy(static_cast<void*>(&v), p, sizeof(T));
    return v;
}
template <typename... A, size_t... I>
inline void call_kernel(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(load_param<std::decay_t<A>>(args[I])...);
}
template <auto F>
struct KernelEntry;
template <typename... A, void (*F)(A...)>
struct KernelEntry<F> {
    static void thunk(void** args) { call_kernel(F, args, std::index_sequence_for<A...>{}); }
    static constexpr int num_params = sizeof...(A);
    static constexpr size_t sizes[sizeof...(A) + 1] = {sizeof(std::decay_t<A>)..., 0};
};
}  // namespace tpo_emu

#define TPO_EMU_ENTRY(name)                                                                                   \
    EmuKernel {                                                                                               \
        #name, &::tpo_emu::KernelEntry<&name>::thunk, ::tpo_emu::KernelEntry<&name>::num_params,             \
            ::tpo_emu::KernelEntry<&name>::sizes                                                              \
    }
