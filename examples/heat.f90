! A 2-D heat-equation solver on an N x N grid of doubles, made restartable with the supervise
! shim through its Fortran module. The same algorithm, options and last line as heat.rs and
! heat.c: `checksum <hex>` (blake3 of the final grid's bytes, row-major), so all three agree.
!
!   gfortran -O2 shim/capi/include/supervise.f90 examples/heat.f90 \
!       $(pkg-config --libs supervise-shim) -o heat-f
!   supervise --every 5s -- ./heat-f --n 2048 --steps 5400
program heat
    use, intrinsic :: iso_c_binding
    use supervise
    implicit none
    integer(c_int64_t) :: n = 2048, steps = 5400
    integer(c_int64_t), target :: step = 0
    real(c_double), parameter :: alpha = 0.2d0
    ! grid(j, i): column j of row i, so memory order is row-major as in heat.rs and heat.c.
    real(c_double), allocatable, target :: a(:, :), b(:, :)
    integer :: k, nargs, cur
    character(len=64) :: arg, tag
    integer(c_size_t) :: bytes

    nargs = command_argument_count()
    k = 1
    do while (k <= nargs)
        call get_command_argument(k, arg)
        if (arg == '--n' .and. k < nargs) then
            call get_command_argument(k + 1, arg)
            read (arg, *) n
        else if (arg == '--steps' .and. k < nargs) then
            call get_command_argument(k + 1, arg)
            read (arg, *) steps
        else
            write (0, '(a)') 'usage: heat-f [--n N] [--steps S]'
            stop 2
        end if
        k = k + 2
    end do
    allocate (a(n, n), b(n, n))
    a = 0d0
    a(:, 1) = 100d0
    bytes = int(n * n * 8, c_size_t)
    cur = 1

    ! 1. Start the shim, register the state, restore it when this run resumes.
    if (sv_init() /= 0) call fail('sv_init')
    if (sv_protect('grid', c_loc(a), bytes) /= 0) call fail('sv_protect grid')
    if (sv_protect('step', c_loc(step), 8_c_size_t) /= 0) call fail('sv_protect step')
    if (sv_is_restart() == 1) then
        if (sv_restore() /= 0) call fail('sv_restore')
        write (0, '(a, i0)') 'heat.f90: resumed at step ', step
    end if
    b = a

    do while (step < steps)
        if (cur == 1) then
            call advance(a, b)
        else
            call advance(b, a)
        end if
        cur = 3 - cur
        step = step + 1
        ! 2. At a safe point: one atomic load unless a snapshot is due. The grid lives in
        ! the other array every other step: register where it is now.
        if (sv_checkpoint_requested() == 1) then
            write (tag, '(a, i0)') 'step ', step
            if (cur == 1) then
                k = sv_protect('grid', c_loc(a), bytes)
            else
                k = sv_protect('grid', c_loc(b), bytes)
            end if
            k = sv_checkpoint(tag)
            if (k == SV_STOP) then
                ! Asked to stop: the final snapshot is taken.
                k = sv_finalize_stopped()
                stop SV_EXIT_STOPPED, quiet=.true.
            else if (k /= 0) then
                write (0, '(2a)') 'heat.f90: snapshot failed, continuing: ', sv_error_message()
            end if
        end if
    end do
    call sv_finalize()
    if (cur == 1) then
        write (*, '(2a)') 'checksum ', sv_digest_hex(c_loc(a), bytes)
    else
        write (*, '(2a)') 'checksum ', sv_digest_hex(c_loc(b), bytes)
    end if

contains

    subroutine advance(cur_grid, next)
        real(c_double), intent(in) :: cur_grid(:, :)
        real(c_double), intent(inout) :: next(:, :)
        integer(c_int64_t) :: r, c
        do r = 2, n - 1
            next(1, r) = cur_grid(1, r)
            next(n, r) = cur_grid(n, r)
            do c = 2, n - 1
                next(c, r) = cur_grid(c, r) + alpha * (cur_grid(c, r - 1) + cur_grid(c, r + 1) &
                             + cur_grid(c - 1, r) + cur_grid(c + 1, r) - 4d0 * cur_grid(c, r))
            end do
        end do
    end subroutine

    subroutine fail(what)
        character(len=*), intent(in) :: what
        write (0, '(3a)') 'heat.f90: ', what, ': ' // sv_error_message()
        stop 1
    end subroutine
end program heat
