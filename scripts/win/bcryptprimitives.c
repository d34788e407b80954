/* bcryptprimitives.dll for wine 8, which lacks it: Rust's std (>= 1.78) imports ProcessPrng
 * from it for its random numbers (HashMap seeds). Built by scripts/win/setup.sh with MinGW and
 * found by wine's loader through WINEPATH (scripts/win/env.sh). Real Windows 10+ has the DLL;
 * the shim is never shipped. ProcessPrng fills the buffer and always succeeds on Windows; here
 * it forwards to RtlGenRandom (advapi32's SystemFunction036), at most 256 MiB a call. */
#include <windows.h>
#include <ntsecapi.h>

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len) {
        ULONG n = len > 0x10000000 ? 0x10000000 : (ULONG)len;
        if (!RtlGenRandom(data, n))
            return FALSE;
        data += n;
        len -= n;
    }
    return TRUE;
}
