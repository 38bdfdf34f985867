"""Processes of a distributed run: joining the process group (torchrun or SLURM), rank queries, logging once."""
import datetime
import os
import re

import torch
import torch.distributed as dist

from trainer import UserError


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def log(*values):
    """print() on the main process only: every process would print the same progress lines."""
    if is_main_process():
        print(*values, flush=True)


def first_slurm_host(nodelist):
    """First host name of a SLURM node list such as `gpu[07-09,12],cpu3` (-> `gpu07`)."""
    match = re.match(r'([^,\[]+)(?:\[([^\]]+)\])?', nodelist.strip())
    if not match:
        raise UserError(f'cannot read SLURM_NODELIST={nodelist!r}: set MASTER_ADDR to the first node\'s host name')
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + re.split(r'[-,]', ranges)[0]


def init_distributed_mode(args):
    """Join the process group described by torchrun's or SLURM's variables; no-op for a single process.

    Sets args.distributed, args.rank, args.world_size and args.gpu (the local device index).
    """
    env = os.environ
    if 'RANK' in env and 'WORLD_SIZE' in env:  # torchrun
        args.rank, args.world_size = int(env['RANK']), int(env['WORLD_SIZE'])
        args.gpu = int(env.get('LOCAL_RANK', args.local_rank))  # torch.distributed.launch may pass only the flag
    elif int(env.get('SLURM_NTASKS', 1)) > 1 and 'SLURM_PROCID' in env:  # srun, one task per GPU
        args.rank, args.world_size = int(env['SLURM_PROCID']), int(env['SLURM_NTASKS'])
        args.gpu = int(env.get('SLURM_LOCALID', 0))
        if 'MASTER_ADDR' not in env:
            env['MASTER_ADDR'] = first_slurm_host(env.get('SLURM_NODELIST', env.get('SLURM_JOB_NODELIST', '')))
        # A port derived from the job id lets several jobs share a node without clashing.
        env.setdefault('MASTER_PORT', str(20000 + int(env.get('SLURM_JOB_ID', 9500)) % 20000))
        env['RANK'], env['WORLD_SIZE'], env['LOCAL_RANK'] = str(args.rank), str(args.world_size), str(args.gpu)
    else:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, 0
        return
    args.distributed = True
    use_cuda = str(args.device).startswith('cuda')
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        # NCCL's watchdog aborts a collective that exceeds the timeout and ends the process; its heartbeat
        # monitor also ends a process whose watchdog itself is stuck (a hung driver call).
        env.setdefault('TORCH_NCCL_ASYNC_ERROR_HANDLING', '1')
        env.setdefault('TORCH_NCCL_ENABLE_MONITORING', '1')
        env.setdefault('TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC', str(max(int(args.dist_timeout), 60)))
    dist.init_process_group(backend='nccl' if use_cuda else 'gloo', init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank,
                            timeout=datetime.timedelta(seconds=args.dist_timeout))
    dist.barrier()


def collective_timeout(err, timeout):
    """The one-line explanation when `err` is a collective that waited `timeout` seconds in vain, else None."""
    text = str(err).lower()
    if not is_dist_avail_and_initialized() or not isinstance(err, RuntimeError) or 'timed out' not in text \
            and 'timeout' not in text:
        return None
    return (f'process {get_rank()}: another process did not answer within --dist-timeout {timeout:g} s (it hangs, '
            f'was stopped or died); the job stops; the last checkpoint is intact: rerun the same command to continue '
            f'(raise --dist-timeout if a step or save legitimately takes longer)')


def main_process_check(check):
    """Run `check` on the main process only; a UserError that it raises is raised on every process, so
    that no process is left waiting for the others in the next collective."""
    message = None
    if is_main_process():
        try:
            check()
        except UserError as err:
            message = str(err)
    if is_dist_avail_and_initialized():
        shared = [message]
        dist.broadcast_object_list(shared, src=0)
        message = shared[0]
    if message is not None:
        raise UserError(message)
