# bash completion for vmspawnctl                              -*- shell-script -*-
#
# Install: copy to /usr/share/bash-completion/completions/vmspawnctl (loaded
# on demand by bash-completion), or `source` it from ~/.bashrc.
#
# Completes verbs, options, option values, machine names (from
# `vmspawnctl list --no-legend`) and, for `remove-drive NAME <TAB>` (and
# replace-drive, eject-drive, drive-stats, snapshot-drive, swap-drive), the machine's attached drive ids (from
# `vmspawnctl status NAME --json`), for `remove-share NAME <TAB>` its attached
# share ids, for `remove-nic NAME <TAB>` its network interfaces.
# Needs nothing but bash 4; drive ids are read with jq if it is there,
# else with python3 (which vmspawnctl needs anyway).

__vmspawnctl_verbs="list status plan create add-drive remove-drive add-share remove-share replace-drive eject-drive
    add-nic remove-nic poweroff terminate console nmi drive-stats snapshot-drive swap-drive pause resume reboot start
    suspend"
__vmspawnctl_global_opts="--help --json --user --system --no-pager --no-legend --no-ask-password"
__vmspawnctl_machine_opts="--kernel --initrd --cmdline --image --image-format --drive --disk-type --network
    --vsock --memory --cpus --spares --accel --firmware --graphics --qemu-extra --qemu-extra-string"
# Options that take a value in the next word.
__vmspawnctl_value_opts="--kernel --initrd --cmdline --image --image-format --drive --disk-type --network
    --memory --cpus --spares --accel --firmware --graphics --qemu-extra --qemu-extra-string --serial --format --id --port
    --timeout --tag --mac"

# The --user/--system flags on the line, so lookups ask the same bus.
__vmspawnctl_bus_flags() {
    local w
    for w in "${COMP_WORDS[@]}"; do
        case $w in
            --user | --system) printf '%s\n' "$w" ;;
        esac
    done
}

__vmspawnctl_machines() {
    local ctl=$1
    local -a bus
    mapfile -t bus < <(__vmspawnctl_bus_flags)
    "$ctl" list --no-legend --no-pager "${bus[@]}" 2>/dev/null | while read -r name _; do
        printf '%s\n' "$name"
    done
}

# __vmspawnctl_attached CTL MACHINE PROPERTY: the ids of the attached entries of Drives, Shares or Networks.
__vmspawnctl_attached() {
    local ctl=$1 machine=$2 prop=$3
    local -a bus
    mapfile -t bus < <(__vmspawnctl_bus_flags)
    local json
    json=$("$ctl" status "$machine" --json --no-pager "${bus[@]}" 2>/dev/null) || return 0
    if command -v jq >/dev/null 2>&1; then
        jq -r --arg p "$prop" '.[$p][]? | select(.state == "attached") | .id' <<<"$json" 2>/dev/null
    else
        python3 -c '
import json, sys
for d in json.load(sys.stdin).get(sys.argv[1], []):
    if d.get("state") == "attached":
        print(d["id"])
' "$prop" <<<"$json" 2>/dev/null
    fi
}

__vmspawnctl_reply() {
    # $1: candidates, separated by blanks or newlines; $2: the word so far.
    mapfile -t COMPREPLY < <(compgen -W "$1" -- "$2")
}

__vmspawnctl_files() {
    compopt -o filenames 2>/dev/null
    mapfile -t COMPREPLY < <(compgen -f -- "$1")
}

_vmspawnctl() {
    local cur=${COMP_WORDS[COMP_CWORD]}
    local prev=${COMP_WORDS[COMP_CWORD - 1]}
    local ctl=${COMP_WORDS[0]:-vmspawnctl}
    COMPREPLY=()

    # The verb and the positional words after it; option values are skipped.
    local i w verb="" skip=0
    local -a args=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${COMP_WORDS[i]}
        if ((skip)); then
            skip=0
            continue
        fi
        case " ${__vmspawnctl_value_opts//$'\n'/ } " in
            *" $w "*)
                skip=1
                continue
                ;;
        esac
        case $w in
            -*) continue ;;
        esac
        if [[ -z $verb ]]; then
            verb=$w
        else
            args+=("$w")
        fi
    done

    case $prev in
        --kernel | --initrd | --image | --drive)
            __vmspawnctl_files "$cur"
            return 0
            ;;
        --disk-type)
            __vmspawnctl_reply "virtio-blk virtio-scsi virtio-scsi-cdrom nvme" "$cur"
            return 0
            ;;
        --image-format | --format)
            __vmspawnctl_reply "raw qcow2" "$cur"
            return 0
            ;;
        --network)
            __vmspawnctl_reply "none user tap:" "$cur"
            compopt -o nospace 2>/dev/null
            return 0
            ;;
        --accel)
            __vmspawnctl_reply "kvm tcg auto" "$cur"
            return 0
            ;;
        --firmware)
            __vmspawnctl_reply "bios uefi" "$cur"
            return 0
            ;;
        --graphics)
            __vmspawnctl_reply "none vnc spice" "$cur"
            return 0
            ;;
        --cmdline | --memory | --cpus | --spares | --qemu-extra | --qemu-extra-string | --serial | --id | --port | --timeout | \
            --tag | --mac)
            return 0
            ;;
    esac

    local opts=$__vmspawnctl_global_opts
    case $verb in
        plan) opts+=" $__vmspawnctl_machine_opts" ;;
        create) opts+=" $__vmspawnctl_machine_opts --keep" ;;
        add-drive) opts+=" --disk-type --serial --read-only --format --id --port" ;;
        add-share) opts+=" --tag --id" ;;
        remove-drive | remove-share | remove-nic | poweroff) opts+=" --timeout" ;;
        replace-drive) opts+=" --format" ;;
        snapshot-drive | swap-drive) opts+=" --format --timeout" ;;
        add-nic) opts+=" --network --mac --id" ;;
        console) opts+=" --read-only --no-follow" ;;
        "") opts+=" --version" ;;
    esac

    if [[ $cur == -* ]]; then
        __vmspawnctl_reply "${opts//$'\n'/ }" "$cur"
        return 0
    fi
    if [[ -z $verb ]]; then
        __vmspawnctl_reply "$__vmspawnctl_verbs" "$cur"
        return 0
    fi

    case $verb in
        status | terminate | poweroff | console | pause | resume | reboot | start | suspend | add-drive | remove-drive | \
            add-share | remove-share | replace-drive | eject-drive | add-nic | remove-nic | nmi | drive-stats | \
            snapshot-drive | swap-drive)
            if ((${#args[@]} == 0)); then
                __vmspawnctl_reply "$(__vmspawnctl_machines "$ctl")" "$cur"
            elif [[ $verb == remove-drive || $verb == replace-drive || $verb == eject-drive || $verb == drive-stats ||
                $verb == snapshot-drive || $verb == swap-drive ]] && ((${#args[@]} == 1)); then
                __vmspawnctl_reply "$(__vmspawnctl_attached "$ctl" "${args[0]}" Drives)" "$cur"
            elif [[ $verb == remove-share ]] && ((${#args[@]} == 1)); then
                __vmspawnctl_reply "$(__vmspawnctl_attached "$ctl" "${args[0]}" Shares)" "$cur"
            elif [[ $verb == remove-nic ]] && ((${#args[@]} == 1)); then
                __vmspawnctl_reply "$(__vmspawnctl_attached "$ctl" "${args[0]}" Networks)" "$cur"
            elif [[ $verb == replace-drive || $verb == snapshot-drive || $verb == swap-drive ]] && ((${#args[@]} == 2)); then
                __vmspawnctl_files "$cur"
            elif [[ $verb == add-drive ]] && ((${#args[@]} == 1)); then
                __vmspawnctl_files "$cur"
            elif [[ $verb == add-share ]] && ((${#args[@]} == 1)); then
                compopt -o filenames 2>/dev/null
                mapfile -t COMPREPLY < <(compgen -d -- "$cur")
            fi
            ;;
    esac
    return 0
}

complete -F _vmspawnctl vmspawnctl
