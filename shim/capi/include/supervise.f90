! supervise shim: the Fortran interface to the C ABI (shim/capi/include/supervise.h), through
! iso_c_binding. Compile this file with your program and link libsupervise:
!   gfortran shim/capi/include/supervise.f90 sim.f90 $(pkg-config --libs supervise-shim)
!
! Functions return 0 (or the documented positive value) on success and a negative SV_E* code
! on error; sv_error_message() says what went wrong. Names are passed as Fortran strings (the
! wrappers add the NUL); regions are any contiguous variable, passed with c_loc.
module supervise
    use, intrinsic :: iso_c_binding
    implicit none
    private
    public :: sv_init, sv_protect, sv_unprotect, sv_is_restart, sv_restore, &
              sv_checkpoint_requested, sv_checkpoint, sv_poll, sv_finalize, &
              sv_error_message, sv_digest_hex, sv_alloc, sv_should_stop, &
              sv_finalize_stopped, sv_set_rank
    integer(c_int), parameter, public :: SV_OK = 0, SV_EINVAL = -1, SV_ESTATE = -2, &
                                         SV_ESIZE = -3, SV_EIO = -4, SV_EINTERNAL = -5, &
                                         SV_EDAMAGED = -6, SV_STOP = 2, &
                                         SV_EXIT_STOPPED = 75

    interface
        integer(c_int) function sv_init() bind(c, name="sv_init")
            import :: c_int
        end function
        ! Before sv_init, for launchers whose variables the shim does not read.
        integer(c_int) function sv_set_rank(rank, size) bind(c, name="sv_set_rank")
            import :: c_int
            integer(c_int), value :: rank, size
        end function
        integer(c_int) function c_protect(name, ptr, bytes) bind(c, name="sv_protect")
            import :: c_int, c_char, c_ptr, c_size_t
            character(kind=c_char), dimension(*), intent(in) :: name
            type(c_ptr), value :: ptr
            integer(c_size_t), value :: bytes
        end function
        type(c_ptr) function c_alloc(name, bytes) bind(c, name="sv_alloc")
            import :: c_ptr, c_char, c_size_t
            character(kind=c_char), dimension(*), intent(in) :: name
            integer(c_size_t), value :: bytes
        end function
        integer(c_int) function c_unprotect(name) bind(c, name="sv_unprotect")
            import :: c_int, c_char
            character(kind=c_char), dimension(*), intent(in) :: name
        end function
        integer(c_int) function sv_is_restart() bind(c, name="sv_is_restart")
            import :: c_int
        end function
        integer(c_int) function sv_restore() bind(c, name="sv_restore")
            import :: c_int
        end function
        integer(c_int) function sv_checkpoint_requested() bind(c, name="sv_checkpoint_requested")
            import :: c_int
        end function
        integer(c_int) function c_checkpoint(tag) bind(c, name="sv_checkpoint")
            import :: c_int, c_char
            character(kind=c_char), dimension(*), intent(in) :: tag
        end function
        integer(c_int) function c_poll(tag) bind(c, name="sv_poll")
            import :: c_int, c_char
            character(kind=c_char), dimension(*), intent(in) :: tag
        end function
        subroutine sv_finalize() bind(c, name="sv_finalize")
        end subroutine
        integer(c_int) function sv_should_stop() bind(c, name="sv_should_stop")
            import :: c_int
        end function
        ! sv_finalize, then SV_EXIT_STOPPED: after SV_STOP and the program's clean-up,
        ! `k = sv_finalize_stopped()` then `stop SV_EXIT_STOPPED, quiet=.true.`.
        integer(c_int) function sv_finalize_stopped() bind(c, name="sv_finalize_stopped")
            import :: c_int
        end function
        type(c_ptr) function c_last_error() bind(c, name="sv_last_error")
            import :: c_ptr
        end function
        integer(c_int) function c_digest_hex(ptr, bytes, out) bind(c, name="sv_digest_hex")
            import :: c_int, c_ptr, c_size_t, c_char
            type(c_ptr), value :: ptr
            integer(c_size_t), value :: bytes
            character(kind=c_char), dimension(65), intent(out) :: out
        end function
        integer(c_size_t) function c_strlen(s) bind(c, name="strlen")
            import :: c_size_t, c_ptr
            type(c_ptr), value :: s
        end function
    end interface

contains

    ! Registers `bytes` bytes at `ptr` (c_loc of a contiguous variable with the target
    ! attribute) under `name`.
    integer(c_int) function sv_protect(name, ptr, bytes)
        character(len=*), intent(in) :: name
        type(c_ptr), intent(in) :: ptr
        integer(c_size_t), intent(in) :: bytes
        sv_protect = c_protect(trim(name) // c_null_char, ptr, bytes)
    end function

    ! Memory owned by the shim under `name` (restored when this run resumes; snapshots copy
    ! only the chunks written since the last one). Map it with c_f_pointer. c_null_ptr on error.
    type(c_ptr) function sv_alloc(name, bytes)
        character(len=*), intent(in) :: name
        integer(c_size_t), intent(in) :: bytes
        sv_alloc = c_alloc(trim(name) // c_null_char, bytes)
    end function

    integer(c_int) function sv_unprotect(name)
        character(len=*), intent(in) :: name
        sv_unprotect = c_unprotect(trim(name) // c_null_char)
    end function

    integer(c_int) function sv_checkpoint(tag)
        character(len=*), intent(in) :: tag
        sv_checkpoint = c_checkpoint(trim(tag) // c_null_char)
    end function

    integer(c_int) function sv_poll(tag)
        character(len=*), intent(in) :: tag
        sv_poll = c_poll(trim(tag) // c_null_char)
    end function

    ! The message of the last error on this thread.
    function sv_error_message() result(msg)
        character(len=:), allocatable :: msg
        type(c_ptr) :: p
        character(kind=c_char), pointer :: chars(:)
        integer :: i, n
        p = c_last_error()
        n = int(c_strlen(p))
        call c_f_pointer(p, chars, [n])
        allocate (character(len=n) :: msg)
        do i = 1, n
            msg(i:i) = chars(i)
        end do
    end function

    ! The blake3 hash of `bytes` bytes at `ptr`, as 64 hex digits.
    function sv_digest_hex(ptr, bytes) result(hex)
        type(c_ptr), intent(in) :: ptr
        integer(c_size_t), intent(in) :: bytes
        character(len=64) :: hex
        character(kind=c_char), dimension(65) :: out
        integer :: i
        hex = ''
        if (c_digest_hex(ptr, bytes, out) /= 0) return
        do i = 1, 64
            hex(i:i) = out(i)
        end do
    end function
end module supervise
