//! VSS shadow copies of a volume for `backup --snapshot vss` (**experimental: never run on real
//! Windows**; wine has no VSS, see docs/WINDOWS.md).
//!
//! The requester sequence of the VSS documentation, with a non-persistent, auto-release
//! context (`VSS_CTX_BACKUP`) and a copy backup (`VSS_BT_COPY`: writers keep their own backup
//! history, logs are not truncated): `CreateVssBackupComponents`, `InitializeForBackup`,
//! `SetContext`, `SetBackupState`, `GatherWriterMetadata`, `StartSnapshotSet`,
//! `AddToSnapshotSet(volume)`, `PrepareForBackup`, `DoSnapshotSet`, `GetSnapshotProperties`
//! (the shadow device, `\\?\GLOBALROOT\Device\HarddiskVolumeShadowCopyN`). The returned
//! [`VssShadowCopy`] deletes the shadow copy when it is dropped (`BackupComplete`,
//! `DeleteSnapshots`): at the end of a backup, on an error, and after Ctrl-C, which volback
//! turns into a clean stop. If the process dies instead, VSS releases an auto-release shadow
//! copy itself when its requester goes away.
//!
//! `IVssBackupComponents` is a C++ abstract class of `vsbackup.h`, absent from the Win32
//! metadata (neither the `windows` nor the `windows-sys` crate has it), so its vtable is
//! declared here: [`BackupComponentsVtbl`] names the slots volback calls, at the positions
//! the header gives them (checked at compile time), the others are padding. `vssapi.dll` is
//! loaded from the system directory when a shadow copy is asked for, so that nothing else
//! depends on it.

use crate::platform::windevice::{self, DevicePath};
use std::ffi::c_void;
use std::io;
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};

type Hresult = i32;

/// `GUID` (`VSS_ID`).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
struct Guid {
    data1: u32,
    data2: u16,
    data3: u16,
    data4: [u8; 8],
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = &self.data4;
        write!(
            f,
            "{{{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}}}",
            self.data1, self.data2, self.data3, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]
        )
    }
}

/// `VSS_SNAPSHOT_PROP` of <vss.h> (128 bytes on x86_64); volback reads only the device.
#[repr(C)]
#[allow(dead_code)]
struct SnapshotProp {
    snapshot_id: Guid,
    snapshot_set_id: Guid,
    snapshots_count: i32,
    snapshot_device_object: *mut u16,
    original_volume_name: *mut u16,
    originating_machine: *mut u16,
    service_machine: *mut u16,
    exposed_name: *mut u16,
    exposed_path: *mut u16,
    provider_id: Guid,
    snapshot_attributes: i32,
    creation_timestamp: i64,
    status: i32,
}
const _: () = assert!(size_of::<SnapshotProp>() == 128);
const _: () = assert!(offset_of!(SnapshotProp, snapshot_device_object) == 40);
const _: () = assert!(offset_of!(SnapshotProp, creation_timestamp) == 112);

/// The `IUnknown` part of every vtable.
#[repr(C)]
struct UnknownVtbl {
    query_interface: usize,
    add_ref: usize,
    release: unsafe extern "system" fn(this: *mut c_void) -> u32,
}

/// `IVssAsync` (<vss.h>): `Cancel`, `Wait`, `QueryStatus` after `IUnknown`.
#[repr(C)]
struct AsyncVtbl {
    unknown: UnknownVtbl,
    cancel: usize,
    wait: unsafe extern "system" fn(this: *mut c_void, milliseconds: u32) -> Hresult,
    query_status: unsafe extern "system" fn(
        this: *mut c_void,
        result: *mut Hresult,
        reserved: *mut i32,
    ) -> Hresult,
}

type AsyncOut = unsafe extern "system" fn(this: *mut c_void, out: *mut *mut c_void) -> Hresult;

/// `IVssBackupComponents` (<vsbackup.h>), slots 0 to 42 of 48; `_n_m` pads slots n to m,
/// which volback does not call.
#[repr(C)]
struct BackupComponentsVtbl {
    unknown: UnknownVtbl,
    _3_4: [usize; 2],
    initialize_for_backup: unsafe extern "system" fn(this: *mut c_void, xml: *const u16) -> Hresult,
    set_backup_state: unsafe extern "system" fn(
        this: *mut c_void,
        select_components: u8,
        bootable_system_state: u8,
        backup_type: i32,
        partial_file_support: u8,
    ) -> Hresult,
    _7_8: [usize; 2],
    gather_writer_metadata: AsyncOut,
    _10_13: [usize; 4],
    prepare_for_backup: AsyncOut,
    abort_backup: unsafe extern "system" fn(this: *mut c_void) -> Hresult,
    _16_26: [usize; 11],
    backup_complete: AsyncOut,
    _28_34: [usize; 7],
    set_context: unsafe extern "system" fn(this: *mut c_void, context: i32) -> Hresult,
    start_snapshot_set: unsafe extern "system" fn(this: *mut c_void, set_id: *mut Guid) -> Hresult,
    add_to_snapshot_set: unsafe extern "system" fn(
        this: *mut c_void,
        volume: *const u16,
        provider: Guid,
        snapshot_id: *mut Guid,
    ) -> Hresult,
    do_snapshot_set: AsyncOut,
    delete_snapshots: unsafe extern "system" fn(
        this: *mut c_void,
        source_id: Guid,
        source_type: i32,
        force: i32,
        deleted: *mut i32,
        not_deleted: *mut Guid,
    ) -> Hresult,
    _40_41: [usize; 2],
    get_snapshot_properties:
        unsafe extern "system" fn(this: *mut c_void, id: Guid, prop: *mut SnapshotProp) -> Hresult,
}

/// Each method at the slot <vsbackup.h> gives it (`IVssBackupComponentsVtbl`).
const fn at(slot: usize) -> usize {
    slot * size_of::<usize>()
}
const _: () = {
    assert!(offset_of!(BackupComponentsVtbl, initialize_for_backup) == at(5));
    assert!(offset_of!(BackupComponentsVtbl, set_backup_state) == at(6));
    assert!(offset_of!(BackupComponentsVtbl, gather_writer_metadata) == at(9));
    assert!(offset_of!(BackupComponentsVtbl, prepare_for_backup) == at(14));
    assert!(offset_of!(BackupComponentsVtbl, abort_backup) == at(15));
    assert!(offset_of!(BackupComponentsVtbl, backup_complete) == at(27));
    assert!(offset_of!(BackupComponentsVtbl, set_context) == at(35));
    assert!(offset_of!(BackupComponentsVtbl, start_snapshot_set) == at(36));
    assert!(offset_of!(BackupComponentsVtbl, add_to_snapshot_set) == at(37));
    assert!(offset_of!(BackupComponentsVtbl, do_snapshot_set) == at(38));
    assert!(offset_of!(BackupComponentsVtbl, delete_snapshots) == at(39));
    assert!(offset_of!(BackupComponentsVtbl, get_snapshot_properties) == at(42));
    assert!(offset_of!(AsyncVtbl, wait) == at(4));
    assert!(offset_of!(AsyncVtbl, query_status) == at(5));
};

/// `VSS_CTX_BACKUP`: non-persistent, released when the requester releases it or exits.
const VSS_CTX_BACKUP: i32 = 0;
/// `VSS_BT_COPY`.
const VSS_BT_COPY: i32 = 5;
/// `VSS_OBJECT_SNAPSHOT`.
const VSS_OBJECT_SNAPSHOT: i32 = 3;
/// `VSS_S_ASYNC_FINISHED`, `VSS_S_ASYNC_PENDING`.
const VSS_S_ASYNC_FINISHED: Hresult = 0x0004_230A;
const VSS_S_ASYNC_PENDING: Hresult = 0x0004_2309;
/// `COINIT_MULTITHREADED`.
const COINIT_MULTITHREADED: u32 = 0;
/// `RPC_E_CHANGED_MODE`: COM was already initialised as a single-threaded apartment.
const RPC_E_CHANGED_MODE: Hresult = 0x8001_0106_u32 as i32;
/// `RPC_C_AUTHN_LEVEL_PKT_PRIVACY`, `RPC_C_IMP_LEVEL_IDENTIFY`, `EOAC_DYNAMIC_CLOAKING`: the
/// process security VSS requesters are told to set.
const RPC_C_AUTHN_LEVEL_PKT_PRIVACY: u32 = 6;
const RPC_C_IMP_LEVEL_IDENTIFY: u32 = 2;
const EOAC_DYNAMIC_CLOAKING: u32 = 0x40;
/// `LOAD_LIBRARY_SEARCH_SYSTEM32`.
const LOAD_LIBRARY_SEARCH_SYSTEM32: u32 = 0x0800;
/// `INFINITE`.
const INFINITE: u32 = u32::MAX;

#[link(name = "ole32")]
unsafe extern "system" {
    fn CoInitializeEx(reserved: *mut c_void, coinit: u32) -> Hresult;
    fn CoUninitialize();
    #[allow(clippy::too_many_arguments)]
    fn CoInitializeSecurity(
        security_descriptor: *mut c_void,
        auth_services: i32,
        auth_service_list: *mut c_void,
        reserved1: *mut c_void,
        authn_level: u32,
        imp_level: u32,
        auth_list: *mut c_void,
        capabilities: u32,
        reserved3: *mut c_void,
    ) -> Hresult;
}

#[link(name = "kernel32")]
unsafe extern "system" {
    fn LoadLibraryExW(name: *const u16, file: *mut c_void, flags: u32) -> *mut c_void;
    fn GetProcAddress(module: *mut c_void, name: *const u8) -> *mut c_void;
}

type CreateComponents = unsafe extern "system" fn(out: *mut *mut c_void) -> Hresult;
type FreeProperties = unsafe extern "system" fn(prop: *mut SnapshotProp);

fn failed(hr: Hresult) -> bool {
    hr < 0
}

/// An error naming the VSS step that failed and what its result code means.
fn vss_error(step: &str, hr: Hresult) -> io::Error {
    let text = windevice::vss_result_text(hr as u32);
    let kind = match hr as u32 {
        0x8007_0005 => io::ErrorKind::PermissionDenied,
        0x8000_4001 | 0x8004_232F | 0x8004_230C => io::ErrorKind::Unsupported,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("VSS shadow copy: {step} failed: {text}"))
}

fn wide(s: &str) -> Vec<u16> {
    s.encode_utf16().chain(std::iter::once(0)).collect()
}

/// COM initialised on this thread (multi-threaded apartment) for as long as it lives.
struct Com {
    uninitialize: bool,
}

impl Com {
    fn init() -> io::Result<Com> {
        // SAFETY: no pointer is passed but the reserved null; the call only sets up COM for
        // the calling thread.
        let hr = unsafe { CoInitializeEx(std::ptr::null_mut(), COINIT_MULTITHREADED) };
        if hr == RPC_E_CHANGED_MODE {
            // Already a single-threaded apartment: VSS works there too; not ours to undo.
            return Ok(Com {
                uninitialize: false,
            });
        }
        if failed(hr) {
            return Err(vss_error("CoInitializeEx", hr));
        }
        // Process-wide security as the VSS documentation asks of requesters; it fails with
        // RPC_E_TOO_LATE when something set it already, which is fine.
        // SAFETY: every pointer argument is null (defaults); -1 asks COM to choose the
        // authentication services.
        let _ = unsafe {
            CoInitializeSecurity(
                std::ptr::null_mut(),
                -1,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                RPC_C_AUTHN_LEVEL_PKT_PRIVACY,
                RPC_C_IMP_LEVEL_IDENTIFY,
                std::ptr::null_mut(),
                EOAC_DYNAMIC_CLOAKING,
                std::ptr::null_mut(),
            )
        };
        Ok(Com { uninitialize: true })
    }
}

impl Drop for Com {
    fn drop(&mut self) {
        if self.uninitialize {
            // SAFETY: balances the successful CoInitializeEx of this thread (the shadow copy
            // is not Send: it is dropped on the thread that made it).
            unsafe { CoUninitialize() };
        }
    }
}

/// `vssapi.dll`'s two functions volback needs, from the system directory.
struct VssApi {
    create: CreateComponents,
    free_properties: FreeProperties,
}

impl VssApi {
    fn load() -> io::Result<VssApi> {
        let name = wide("vssapi.dll");
        // SAFETY: `name` is a live NUL-terminated UTF-16 string; no file handle. The module
        // stays loaded for the life of the process (never freed: COM objects use its code).
        let module = unsafe {
            LoadLibraryExW(
                name.as_ptr(),
                std::ptr::null_mut(),
                LOAD_LIBRARY_SEARCH_SYSTEM32,
            )
        };
        if module.is_null() {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("VSS shadow copy: cannot load vssapi.dll: {e}"),
            ));
        }
        let symbol = |name: &[u8]| {
            // SAFETY: `module` is a loaded module; `name` is a NUL-terminated ASCII string.
            let p = unsafe { GetProcAddress(module, name.as_ptr()) };
            if p.is_null() {
                let shown = String::from_utf8_lossy(&name[..name.len() - 1]).into_owned();
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("VSS shadow copy: vssapi.dll has no {shown}"),
                ));
            }
            Ok(p)
        };
        let create = symbol(b"CreateVssBackupComponentsInternal\0")?;
        let free = symbol(b"VssFreeSnapshotPropertiesInternal\0")?;
        // SAFETY: both exports have these signatures in <vsbackup.h>
        // (`HRESULT CreateVssBackupComponentsInternal(IVssBackupComponents **)`,
        // `void VssFreeSnapshotPropertiesInternal(VSS_SNAPSHOT_PROP *)`); a function pointer
        // has the size of the data pointer GetProcAddress returns.
        unsafe {
            Ok(VssApi {
                create: std::mem::transmute::<*mut c_void, CreateComponents>(create),
                free_properties: std::mem::transmute::<*mut c_void, FreeProperties>(free),
            })
        }
    }
}

/// An `IVssAsync` that this code owns (released on drop).
struct Async(*mut c_void);

impl Async {
    /// Waits for the operation and checks how it ended.
    fn wait(self, step: &str) -> io::Result<()> {
        // SAFETY: `self.0` is a live IVssAsync (checked non-null by `Components::call_async`);
        // its first field points to its vtable, whose layout `AsyncVtbl` reproduces.
        let vtbl = unsafe { &**(self.0 as *const *const AsyncVtbl) };
        // SAFETY: a method of the live object, called with itself.
        let hr = unsafe { (vtbl.wait)(self.0, INFINITE) };
        if failed(hr) {
            return Err(vss_error(step, hr));
        }
        let mut result: Hresult = 0;
        // SAFETY: as above; `result` is live; the reserved pointer may be null.
        let hr = unsafe { (vtbl.query_status)(self.0, &mut result, std::ptr::null_mut()) };
        if failed(hr) {
            return Err(vss_error(step, hr));
        }
        match result {
            VSS_S_ASYNC_FINISHED => Ok(()),
            VSS_S_ASYNC_PENDING => Err(vss_error(step, result)),
            r if failed(r) => Err(vss_error(step, r)),
            // Other success codes (S_OK from some providers) count as finished.
            _ => Ok(()),
        }
    }
}

impl Drop for Async {
    fn drop(&mut self) {
        // SAFETY: `self.0` is a live COM object this code holds one reference to.
        unsafe {
            let vtbl = &**(self.0 as *const *const AsyncVtbl);
            (vtbl.unknown.release)(self.0);
        }
    }
}

/// An `IVssBackupComponents` that this code owns; released on drop, after `AbortBackup` if a
/// backup was started and not completed.
struct Components {
    this: *mut c_void,
    abort_on_drop: bool,
}

impl Components {
    fn vtbl(&self) -> &BackupComponentsVtbl {
        // SAFETY: `this` is a live IVssBackupComponents (non-null, checked at creation); its
        // first field points to its vtable, whose first 43 slots `BackupComponentsVtbl`
        // reproduces (positions checked at compile time above).
        unsafe { &**(self.this as *const *const BackupComponentsVtbl) }
    }

    fn check(step: &str, hr: Hresult) -> io::Result<()> {
        if failed(hr) {
            return Err(vss_error(step, hr));
        }
        Ok(())
    }

    /// Calls a method that starts an asynchronous operation, and waits for it.
    fn call_async(&self, step: &str, method: AsyncOut) -> io::Result<()> {
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: a method of the live object, called with itself and a live out pointer.
        Self::check(step, unsafe { method(self.this, &mut out) })?;
        if out.is_null() {
            return Err(io::Error::other(format!(
                "VSS shadow copy: {step} gave no IVssAsync to wait on"
            )));
        }
        Async(out).wait(step)
    }
}

impl Drop for Components {
    fn drop(&mut self) {
        let v = self.vtbl();
        let (abort, release) = (v.abort_backup, v.unknown.release);
        if self.abort_on_drop {
            // SAFETY: a method of the live object, called with itself.
            let _ = unsafe { abort(self.this) };
        }
        // SAFETY: this code holds one reference to the object, given back here.
        unsafe { release(self.this) };
    }
}

/// A VSS shadow copy of a volume, deleted when dropped (see the module documentation).
pub struct VssShadowCopy {
    volume: String,
    device: PathBuf,
    snapshot_id: Guid,
    deleted: bool,
    // Dropped in this order, after `drop` deleted the shadow copy: the components, then COM.
    components: Components,
    _com: Com,
}

impl VssShadowCopy {
    /// Ends the backup (`BackupComplete`) and deletes the shadow copy (`DeleteSnapshots`).
    fn delete_now(&mut self) -> io::Result<()> {
        if self.deleted {
            return Ok(());
        }
        self.deleted = true;
        let v = self.components.vtbl();
        let (complete, delete) = (v.backup_complete, v.delete_snapshots);
        let completed = self.components.call_async("BackupComplete", complete);
        self.components.abort_on_drop = completed.is_err();
        let (mut count, mut not_deleted) = (0i32, Guid::default());
        // SAFETY: a method of the live object, called with itself, the id of the shadow copy
        // it made, and live out pointers.
        let hr = unsafe {
            delete(
                self.components.this,
                self.snapshot_id,
                VSS_OBJECT_SNAPSHOT,
                1,
                &mut count,
                &mut not_deleted,
            )
        };
        Components::check("DeleteSnapshots", hr).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{e} (shadow copy {} of {} at {}: delete it with `vssadmin delete shadows \
                     /shadow={}`)",
                    self.snapshot_id,
                    self.volume,
                    self.device.display(),
                    self.snapshot_id
                ),
            )
        })?;
        completed
    }
}

impl Drop for VssShadowCopy {
    fn drop(&mut self) {
        if let Err(e) = self.delete_now() {
            eprintln!("volback: warning: {e}");
        }
    }
}

impl crate::platform::ShadowCopy for VssShadowCopy {
    fn device_path(&self) -> &Path {
        &self.device
    }

    fn volume(&self) -> &str {
        &self.volume
    }

    fn delete(mut self: Box<Self>) -> io::Result<()> {
        self.delete_now()
    }
}

/// The volume a shadow copy can be taken of, from the source path: `\\.\X:` or
/// `\\?\Volume{GUID}`; anything else is refused with the reason.
pub fn volume_name(source: &Path) -> io::Result<(DevicePath, String)> {
    let s = source.to_string_lossy();
    let refuse = |why: String| Err(io::Error::new(io::ErrorKind::InvalidInput, why));
    if !windevice::is_device_namespace(&s) {
        return refuse(format!(
            "VSS shadow copies are taken of volumes (\\\\.\\X: or \\\\?\\Volume{{GUID}}); {} is \
             a file: back it up with --snapshot none",
            source.display()
        ));
    }
    let device = windevice::parse_device_path(&s)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    match device.vss_volume_name() {
        Some(name) => Ok((device, name)),
        None if device.is_disk() => refuse(format!(
            "VSS shadow copies are taken of volumes, and {device} is a whole disk: back up its \
             volumes (\\\\.\\X:) one by one, or the disk with --snapshot none"
        )),
        None => refuse(format!(
            "{device} is a shadow copy already: back it up with --snapshot none"
        )),
    }
}

/// Takes a shadow copy of the volume `source` names (see the module documentation).
pub fn take(source: &Path) -> io::Result<VssShadowCopy> {
    let (device, name) = volume_name(source)?;
    let com = Com::init()?;
    let api = VssApi::load()?;
    let mut this: *mut c_void = std::ptr::null_mut();
    // SAFETY: the export's signature (see `VssApi::load`), with a live out pointer.
    let hr = unsafe { (api.create)(&mut this) };
    if failed(hr) {
        return Err(vss_error("CreateVssBackupComponents", hr));
    }
    if this.is_null() {
        return Err(io::Error::other(
            "VSS shadow copy: CreateVssBackupComponents gave no object",
        ));
    }
    let mut c = Components {
        this,
        abort_on_drop: false,
    };
    let v = c.vtbl();
    let (init, set_context, set_state) =
        (v.initialize_for_backup, v.set_context, v.set_backup_state);
    let (gather, start, add, prepare, snap, props) = (
        v.gather_writer_metadata,
        v.start_snapshot_set,
        v.add_to_snapshot_set,
        v.prepare_for_backup,
        v.do_snapshot_set,
        v.get_snapshot_properties,
    );
    // Every call below is a method of the live object `c.this`, called with itself and
    // arguments of the types <vsbackup.h> gives.
    // SAFETY: a null BSTR is the documented "no XML document".
    let hr = unsafe { init(c.this, std::ptr::null()) };
    Components::check("InitializeForBackup", hr)?;
    // SAFETY: plain integer argument.
    let hr = unsafe { set_context(c.this, VSS_CTX_BACKUP) };
    Components::check("SetContext(VSS_CTX_BACKUP)", hr)?;
    // SAFETY: plain integer arguments (`boolean` is one byte).
    let hr = unsafe { set_state(c.this, 0, 0, VSS_BT_COPY, 0) };
    Components::check("SetBackupState", hr)?;
    c.abort_on_drop = true;
    c.call_async("GatherWriterMetadata", gather)?;
    let mut set_id = Guid::default();
    // SAFETY: `set_id` is a live GUID the call writes.
    let hr = unsafe { start(c.this, &mut set_id) };
    Components::check("StartSnapshotSet", hr)?;
    let volume = wide(&name);
    let mut snapshot_id = Guid::default();
    // SAFETY: `volume` is a NUL-terminated UTF-16 string that outlives the call; GUID_NULL
    // lets VSS choose the provider; `snapshot_id` is a live GUID the call writes.
    let hr = unsafe { add(c.this, volume.as_ptr(), Guid::default(), &mut snapshot_id) };
    Components::check(&format!("AddToSnapshotSet({name})"), hr)?;
    c.call_async("PrepareForBackup", prepare)?;
    c.call_async("DoSnapshotSet", snap)?;
    // From here the shadow copy exists: the guard deletes it whatever happens next.
    let mut copy = VssShadowCopy {
        volume: device.to_string(),
        device: PathBuf::new(),
        snapshot_id,
        deleted: false,
        components: c,
        _com: com,
    };
    // SAFETY: an all-zero VSS_SNAPSHOT_PROP is valid (ids zero, pointers null).
    let mut prop: SnapshotProp = unsafe { std::mem::zeroed() };
    // SAFETY: a method of the live object with the id it gave and a live, zeroed
    // VSS_SNAPSHOT_PROP (layout checked above) that it fills.
    let hr = unsafe { props(copy.components.this, snapshot_id, &mut prop) };
    Components::check("GetSnapshotProperties", hr)?;
    let object = prop.snapshot_device_object;
    let shadow = if object.is_null() {
        None
    } else {
        // SAFETY: VSS returned a NUL-terminated UTF-16 string, read up to its NUL (at most
        // 32767 characters, the longest Windows path) before the properties are freed.
        Some(unsafe {
            let len = (0..32767).take_while(|&i| *object.add(i) != 0).count();
            String::from_utf16_lossy(std::slice::from_raw_parts(object, len))
        })
    };
    // SAFETY: frees the strings GetSnapshotProperties allocated in `prop`, once.
    unsafe { (api.free_properties)(&mut prop) };
    let shadow = shadow.ok_or_else(|| {
        io::Error::other("VSS shadow copy: GetSnapshotProperties named no shadow device")
    })?;
    // Only a shadow copy device is read in place of the volume.
    match windevice::parse_device_path(&shadow) {
        Ok(d @ DevicePath::ShadowCopy(_)) => copy.device = PathBuf::from(d.to_string()),
        _ => {
            return Err(io::Error::other(format!(
                "VSS shadow copy: the shadow device {shadow:?} is not of the form {}N",
                windevice::SHADOW_COPY_PREFIX
            )));
        }
    }
    Ok(copy)
}
